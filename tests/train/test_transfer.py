"""Stage 1, attention transfer: the teacher, what trains, and what must stay bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch

import linearize
from linearize import Decoder, ModelConfig
from linearize.models import is_new_parameter
from linearize.train.config import TrainConfig
from linearize.train.trainer import Trainer
from linearize.train.transfer import (
    build_teacher,
    teacher_activations,
    transfer_loss,
    transfer_parameters,
)


def softmax_model(seed: int = 0, architecture: str = "llama") -> Decoder:
    torch.manual_seed(seed)
    config = ModelConfig(
        architecture=architecture,
        vocab_size=128,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2 if architecture == "llama" else 4,
        intermediate_size=128,
    )
    return Decoder(config).double()


def ids(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_teacher_is_the_original_softmax_model(architecture):
    original = softmax_model(architecture=architecture)
    student = linearize.linearize(copy.deepcopy(original), "hedgehog", layers=[0, 2])
    teacher = build_teacher(student)
    torch.testing.assert_close(teacher(ids())[0], original(ids())[0], rtol=0, atol=0)
    # Shared, not copied: the projections, MLPs and embeddings are the student's own tensors.
    for ours, theirs in zip(teacher.layers, student.layers, strict=True):
        assert ours.self_attn.q_proj.weight is theirs.self_attn.q_proj.weight
        assert ours.mlp is theirs.mlp
    assert teacher.embed_tokens is student.embed_tokens


def test_teacher_activations_are_each_layers_input_and_output():
    original = softmax_model()
    expected = {}
    for i, layer in enumerate(original.layers):
        layer.self_attn.register_forward_hook(
            lambda m, args, out, i=i: expected.__setitem__(i, (args[0], out[0]))
        )
    original(ids())
    student = linearize.linearize(copy.deepcopy(original), "augmented")
    acts = teacher_activations(build_teacher(student), ids(), [0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(acts[i][0], expected[i][0], rtol=0, atol=0)
        torch.testing.assert_close(acts[i][1], expected[i][1], rtol=0, atol=0)


def test_loss_is_the_mse_of_each_layer_against_the_softmax_layer():
    original = softmax_model()
    student = linearize.linearize(
        copy.deepcopy(original), {"name": "augmented", "size": 8, "conv": "causal"}
    )
    with torch.no_grad():
        for layer in student.layers:
            layer.self_attn.alpha.fill_(0.3)
            layer.self_attn.conv.normal_(0, 0.1)
    x = ids()
    loss, parts = transfer_loss(
        student,
        build_teacher(student),
        x,
        mse_weight=1.0,
        ce_weight=0.0,
        mse_denominator=x.numel() * 64,
        ce_denominator=1.0,
    )
    acts = teacher_activations(build_teacher(student), x, [0, 1, 2])
    expected = sum(
        torch.mean((student.layers[i].self_attn(acts[i][0])[0] - acts[i][1]) ** 2) for i in range(3)
    )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"mse"}


@pytest.mark.parametrize("attention", ["augmented", "hedgehog", "t2r"])
def test_stage1_touches_only_the_new_parameters(tmp_path, attention):
    # A window shorter than the blocks, so that the augmented layer's global part has tokens
    spec = {"name": attention, "size": 8} if attention == "augmented" else attention
    model = linearize.linearize(softmax_model().float(), spec)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(
        model="tiny",
        attention=attention,
        stage="transfer",
        tokens=3 * 2 * 32,
        block_size=32,
        batch_size=2,
        eval_tokens=0,
        checkpoint_every=0,
        device="cpu",
    )
    data = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(2))
    trained = Trainer(model, config, data).fit().model
    for name, p in trained.named_parameters():
        if not is_new_parameter(name):
            assert torch.equal(p, before[name]), f"base weight {name} changed in stage 1"
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(is_new_parameter(n) for n in changed)


@pytest.mark.parametrize("attention", ["elu", "sliding_window", "performer", "softmax"])
def test_stage1_with_nothing_to_train_is_refused(attention):
    model = linearize.linearize(softmax_model().float(), attention)
    with pytest.raises(ValueError, match="--stage finetune|no linearized layer"):
        transfer_parameters(model)
    config = TrainConfig(
        model="tiny", attention=attention, stage="both", tokens=4096, block_size=32, batch_size=2
    )
    with pytest.raises(ValueError, match="nothing to train|no linearized layer"):
        Trainer(model, config, torch.zeros(512, dtype=torch.long))


def test_stage1_optionally_adds_cross_entropy():
    student = linearize.linearize(softmax_model(), "hedgehog")
    x = ids()
    loss, parts = transfer_loss(
        student,
        build_teacher(student),
        x,
        mse_weight=0.5,
        ce_weight=2.0,
        mse_denominator=100.0,
        ce_denominator=10.0,
    )
    assert set(parts) == {"mse", "ce"}
    torch.testing.assert_close(loss, 0.5 * parts["mse"] + 2.0 * parts["ce"])


def test_windows_that_cover_the_block_leave_transfer_nothing_to_learn():
    from linearize.train.transfer import windows_cover

    model = linearize.linearize(softmax_model(), {"name": "augmented", "size": 8})
    assert windows_cover(model, 12) and not windows_cover(model, 13)  # 8 + 4 sinks
    assert not windows_cover(linearize.linearize(softmax_model(), "hedgehog"), 4)
