"""Medusa heads (distinct modules, LM-head initialisation, save/load), their training and
evaluation, and the hardware-aware planner."""

from __future__ import annotations

import pytest
import torch

from linearize.generation import (
    Calibration,
    MedusaHeads,
    MedusaTrainConfig,
    evaluate_heads,
    load_heads,
    save_heads,
    self_distill_tokens,
    train_medusa,
)
from linearize.generation.planner import (
    Planner,
    calibrate,
    chain_tokens,
    plan_chain,
    plan_medusa,
)
from linearize.generation.trees import TYPICAL_RANK_ACCURACY
from tests.generation.conftest import tiny_model


def test_heads_are_distinct_and_start_as_the_lm_head():
    model = tiny_model("augmented")
    heads = MedusaHeads.from_model(model, num_heads=3)
    assert len({id(h) for h in heads.heads}) == 3
    assert len({h.proj.weight.data_ptr() for h in heads.heads}) == 3
    h = torch.randn(2, 5, 64, dtype=torch.float64)
    logits = heads(h)
    assert logits.shape == (3, 2, 5, 128)
    for m in range(3):
        torch.testing.assert_close(logits[m], model.lm_head(h))
    heads.heads[0].proj.weight.data.add_(1)
    assert not torch.equal(heads.heads[1].proj.weight, heads.heads[0].proj.weight)
    assert not torch.equal(model.lm_head.weight, heads.heads[0].proj.weight)


def test_save_and_load(tmp_path):
    model = tiny_model("softmax")
    assert load_heads(tmp_path) is None
    heads = MedusaHeads.from_model(model)
    with torch.no_grad():
        heads.heads[2].blocks[0].linear.weight.normal_()
    heads.rank_accuracy = [[0.5, 0.1]] * 4
    save_heads(heads, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["medusa.json", "medusa.safetensors"]
    loaded = load_heads(tmp_path).double()
    h = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(loaded(h), heads(h))
    assert loaded.rank_accuracy == heads.rank_accuracy
    (tmp_path / "medusa.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_heads(tmp_path)


def test_model_and_heads_are_saved_together(tmp_path):
    import linearize
    from linearize.generation.medusa import save_with_heads

    model = tiny_model("softmax").float()
    heads = MedusaHeads.from_model(model)
    save_with_heads(model, heads, tmp_path / "m")
    assert {"config.json", "model.safetensors", "medusa.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }
    loaded = linearize.load(tmp_path / "m")
    ids = torch.randint(128, (1, 9))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    for a, b in zip(
        heads.state_dict().values(), load_heads(tmp_path / "m").state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    plain = tiny_model("softmax")
    plain.save(tmp_path / "p")
    assert load_heads(tmp_path / "p") is None


def test_model_directory_written_before_heads_moved_to_generation_still_loads(tmp_path):
    """The format of a model saved with `Decoder.medusa` set (before the heads left models/):
    config.json + model.safetensors (no medusa.* keys) + medusa.json + medusa.safetensors,
    written here by hand."""
    import dataclasses
    import json

    import safetensors.torch

    import linearize

    model = tiny_model("softmax").float()
    config = model.config.to_dict()
    config["attention"] = [
        model.config.attention_config(i).to_dict() for i in range(model.config.num_layers)
    ]
    folder = tmp_path / "old"
    folder.mkdir()
    meta = {"format": "linearize", "format_version": 1, "model": config}
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    heads = MedusaHeads.from_model(model)
    with torch.no_grad():
        heads.heads[0].blocks[0].linear.weight.normal_()
    head_meta = {
        "format": "linearize-medusa",
        "format_version": 1,
        "config": dataclasses.asdict(heads.config),
        "rank_accuracy": None,
        "metrics": {},
    }
    (folder / "medusa.json").write_text(json.dumps(head_meta, indent=2))
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in heads.state_dict().items()},
        folder / "medusa.safetensors",
        metadata={"format": "pt"},
    )
    loaded = linearize.load(folder)
    ids = torch.randint(128, (1, 7))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    h = torch.randn(2, 64, dtype=loaded.dtype)
    torch.testing.assert_close(load_heads(folder)(h), heads(h))


def test_heads_for_another_model_are_refused():
    heads = MedusaHeads.from_model(tiny_model("softmax"))
    with pytest.raises(ValueError, match="vocabulary"):
        heads.check_model(tiny_model("softmax", vocab_size=64))


def test_training_learns_and_reports_accuracies():
    """On a corpus where token t + 2 is a function of token t, trained heads beat fresh ones."""
    model = tiny_model("augmented").float()
    g = torch.Generator().manual_seed(0)
    corpus = torch.randint(0, 128, (6000,), generator=g)
    for t in range(2, 6000):
        if t % 32 >= 2:
            corpus[t] = (corpus[t - 2] * 5 + 3) % 128
    held_out = corpus[:512]
    fresh = evaluate_heads(model, MedusaHeads.from_model(model, 2), held_out, block_size=64)
    # Own projections: a tiny random LM head, shared, cannot express this mapping in 12 steps.
    config = MedusaTrainConfig(
        num_heads=2, tokens=6000, block_size=64, batch_size=8, lr=3e-2, shared_proj=False
    )
    steps = []
    heads = train_medusa(
        model, corpus, config, held_out=held_out, progress=lambda s, n, m: steps.append(m)
    )
    trained = heads.metrics["eval"]
    assert len(steps) == 12
    assert steps[-1]["loss"][0] < steps[0]["loss"][0]
    assert trained["top1"][0] > fresh["top1"][0] + 0.2
    assert len(trained["top1"]) == len(trained["top5"]) == 2
    assert all(t5 >= t1 for t1, t5 in zip(trained["top1"], trained["top5"], strict=True))
    assert heads.rank_accuracy == trained["rank_agreement"]
    assert len(heads.rank_accuracy[0]) == config.top_k


def test_the_seed_alone_sets_trained_heads():
    """Fresh heads and the data's order come from the config's seed, not from what the process
    drew before; the caller's random state is left as it was."""
    model = tiny_model("softmax").float()
    corpus = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(2))

    def train(seed: int, drawn: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        torch.rand(drawn)
        before = torch.get_rng_state()
        config = MedusaTrainConfig(num_heads=2, tokens=256, block_size=64, batch_size=4, seed=seed)
        heads = train_medusa(model, corpus, config)
        assert torch.equal(torch.get_rng_state(), before)
        return {k: v.clone() for k, v in heads.state_dict().items()}

    first, second, other = train(0, 1), train(0, 1000), train(1, 1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_model_labels_with_shared_projection(tmp_path):
    model = tiny_model("hybrid").float()
    lm_head = model.lm_head.weight.clone()
    corpus = torch.randint(0, 128, (1024,), generator=torch.Generator().manual_seed(1))
    config = MedusaTrainConfig(
        num_heads=2, tokens=512, block_size=64, batch_size=4, data="model_labels", shared_proj=True
    )
    heads = train_medusa(model, corpus, config, held_out=corpus[:128])
    assert model.lm_head.weight.grad is None and torch.equal(model.lm_head.weight, lm_head)
    for head in heads.heads:
        assert head.proj is None and head.blocks[0].linear.weight.abs().sum() > 0
    assert len(heads.rank_accuracy) == 2
    h = torch.randn(3, 64)
    with pytest.raises(ValueError, match="pass lm_head"):
        heads(h)
    expected = torch.stack([model.lm_head(head.blocks(h)) for head in heads.heads])
    torch.testing.assert_close(heads(h, model.lm_head), expected)
    save_heads(heads, tmp_path)
    assert (tmp_path / "medusa.safetensors").stat().st_size < 2 * 4 * 64 * 64 * 4
    torch.testing.assert_close(load_heads(tmp_path)(h, model.lm_head), expected)


def test_self_distillation_data():
    model = tiny_model("hybrid")
    corpus = torch.arange(200) % 128
    blocks = self_distill_tokens(model, corpus, num_blocks=3, block_size=24, prompt_tokens=8)
    assert blocks.shape == (3, 24)
    assert blocks[0, :8].tolist() in [corpus[i : i + 8].tolist() for i in range(0, 200, 8)]


def test_bad_training_config():
    with pytest.raises(ValueError, match="data='web'"):
        MedusaTrainConfig(data="web").validate()
    with pytest.raises(ValueError, match="block_size"):
        MedusaTrainConfig(block_size=4).validate()


# --- the planner --------------------------------------------------------------------------------


ACC = [[0.8, 0.1], [0.7, 0.1], [0.6, 0.1], [0.5, 0.1]]


def test_planner_turns_speculation_off_when_verification_is_expensive():
    cpu_like = Calibration(step=1.0, verify={1: 1.0, 2: 3.0, 64: 40.0})
    assert not plan_medusa(cpu_like, ACC).speculating
    assert not plan_chain(cpu_like, 0.6, "draft", [1, 2, 4]).speculating


def test_planner_picks_big_trees_when_verification_is_free():
    gpu_like = Calibration(step=1.0, verify={1: 1.0, 64: 1.0})
    plan = plan_medusa(gpu_like, TYPICAL_RANK_ACCURACY)
    assert plan.nodes == 64 and plan.expected_speedup > 2
    cheap = Calibration(step=1.0, verify={1: 1.0, 2: 1.2, 4: 1.6, 8: 3.0}, overhead=0.02)
    chain = plan_chain(cheap, 0.8, "draft", range(1, 8))
    assert 1 <= chain.gamma <= 4
    assert chain.expected_tokens_per_step == pytest.approx(chain_tokens(0.8, chain.gamma))


def test_calibration_stops_at_the_first_size_that_cannot_pay():
    """Verification costs grow with the tree: once a size costs more than ``ceiling`` plain
    steps (the most tokens any setting gives per pass), no larger one is timed (on an engine,
    each size is a graph to build); the plan is the one every size would have given."""
    model = tiny_model("augmented").float().eval()
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2, 3, 4]]))
    sizes = (1, 2, 4, 8)
    every = calibrate(model, state, 5, sizes, chain=False, repeats=1)
    assert len(every.verify) == len(sizes)
    hopeless = calibrate(model, state, 5, sizes, chain=False, repeats=1, ceiling=1e-6)
    assert len(hopeless.verify) == 1
    assert not plan_medusa(hopeless, ACC, sizes).speculating
    # A ceiling no pass reaches stops nothing.
    generous = calibrate(model, state, 5, sizes, chain=True, repeats=1, ceiling=1e6)
    assert len(generous.verify) == len(sizes)


def test_planner_replans_from_observed_acceptance():
    calibration = Calibration(step=1.0, verify={1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7, 16: 2.5})
    planner = Planner("medusa", calibration, [list(r) for r in ACC], sizes=(2, 4, 8, 16))
    first = planner.choose()
    assert first.speculating
    for _ in range(planner.replan_every):
        replanned = planner.observe(0, 4)
    assert replanned is not None and not replanned.speculating
    chain = Planner("lookup", calibration, acceptance=0.9, gammas=(1, 3, 7))
    assert chain.choose().gamma > 1
    for _ in range(chain.replan_every * 3):
        chain.observe(0, chain.plan.gamma or 1)
    assert chain.acceptance < 0.3


def test_shared_projection_with_a_quantized_head_dequantizes_once():
    """A quantized LM head dequantizes its whole weight on every read; heads that share it read
    it once, and give the same logits."""
    from linearize.models.quantize import quantize

    model = quantize(tiny_model("augmented").float(), "int4")
    heads = MedusaHeads.from_model(model, num_heads=2, shared_proj=True)
    with torch.no_grad():
        for head in heads.heads:
            head.blocks[0].linear.weight.normal_(0, 0.05)
    h = torch.randn(3, model.config.hidden_size)
    expected = torch.nn.functional.linear(heads.residuals(h), model.lm_head.weight)
    logits = heads(h, model.lm_head)
    assert torch.equal(logits, expected)
    assert heads._shared(model.lm_head) is heads._shared(model.lm_head)
    # Another model's head is read afresh.
    other = quantize(tiny_model("augmented", seed=1).float(), "int4")
    assert torch.equal(heads._shared(other.lm_head), other.lm_head.weight)
