"""Stage 2 with LoRA: the paper's trainable set, and merged model ≡ model with adapters."""

from __future__ import annotations

import pytest
import torch

import linearize
from linearize import Decoder, ModelConfig
from linearize.models import is_new_parameter
from linearize.train.config import TrainConfig
from linearize.train.finetune import add_lora, finetune_parameters, merge_lora
from linearize.train.trainer import Trainer


def tiny_model(attention="augmented") -> Decoder:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    )
    model = Decoder(config)
    return linearize.linearize(
        model, {"name": attention, "size": 8, "conv": "causal", "conv_size": 4}
    )


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: Decoder) -> None:
    # B starts at zero (adapters are a no-op at first): make them do something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def test_merged_model_equals_model_with_adapters(tmp_path):
    model = tiny_model().double()
    handle = add_lora(model, r=8, alpha=16)
    randomize_adapters(model)
    with_adapters = model(ids())[0]
    merged = merge_lora(handle)
    assert not any("lora_" in name for name in merged.state_dict())
    torch.testing.assert_close(merged(ids())[0], with_adapters, rtol=1e-12, atol=1e-12)
    # Saved and loaded (as float32) without peft: the same model.
    merged.float().save(tmp_path / "merged")
    loaded = linearize.load(tmp_path / "merged")
    torch.testing.assert_close(loaded(ids())[0], merged(ids())[0], rtol=0, atol=0)


def test_fresh_adapters_do_not_change_the_model():
    model = tiny_model()
    before = model(ids())[0]
    add_lora(model)
    torch.testing.assert_close(model(ids())[0], before, rtol=0, atol=0)


def test_lora_trains_adapters_embeddings_norms_and_new_parameters():
    model = tiny_model()
    add_lora(model, r=8, alpha=16)
    trainable = finetune_parameters(model, lora=True)
    for name, p in model.named_parameters():
        expected = (
            "lora_" in name
            or "embed_tokens" in name
            or "layernorm" in name
            or name == "norm.weight"
            or is_new_parameter(name)
        )
        assert p.requires_grad == expected, name
        assert (name in trainable) == expected, name
    ranks = {p.shape[0] for n, p in trainable.items() if "lora_A" in n}
    assert ranks == {8}


def test_full_finetune_trains_everything():
    model = tiny_model()
    trainable = finetune_parameters(model, lora=False)
    assert set(trainable) == {n for n, _ in model.named_parameters()}


def test_finetune_without_adapters_is_refused():
    with pytest.raises(ValueError, match="add_lora"):
        finetune_parameters(tiny_model(), lora=True)


def test_lora_stage_keeps_frozen_weights_and_saves_without_peft(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(
        model="tiny",
        stage="finetune",
        lora=True,
        tokens=3 * 2 * 32,
        block_size=32,
        batch_size=2,
        lr=1e-2,
        eval_tokens=0,
        checkpoint_every=0,
        device="cpu",
    )
    data = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(2))
    result = Trainer(model, config, data, out=tmp_path).fit()
    trained = dict(result.model.named_parameters())
    assert set(trained) == set(before), "adapters left in the trained model"
    for name, p in trained.items():
        if "mlp" in name:
            assert torch.equal(p, before[name]), f"{name} is frozen under LoRA"
    # The adapters were merged into q/k/v/o, which therefore moved.
    assert not torch.equal(
        trained["layers.0.self_attn.q_proj.weight"], before["layers.0.self_attn.q_proj.weight"]
    )
    saved = linearize.load(tmp_path / "model")
    torch.testing.assert_close(saved(ids())[0], result.model(ids())[0], rtol=0, atol=0)
