"""Checkpoints and exact resume: interrupted + resumed ≡ uninterrupted, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize import Decoder, ModelConfig
from linearize.train import checkpointing
from linearize.train.config import TrainConfig
from linearize.train.trainer import Trainer


class Interrupted(Exception):
    """Stands for a kill: raised from the progress callback after a given step."""


def tiny_model() -> Decoder:
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
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.1)
    return linearize.linearize(
        model, {"name": "augmented", "size": 8, "conv": "causal", "conv_size": 4}
    )


def config(**overrides) -> TrainConfig:
    # Transfer: 4 steps, finetune: 6 steps, a checkpoint every 2.
    values = dict(
        model="tiny",
        attention="augmented",
        attention_options={"size": 8, "conv": "causal", "conv_size": 4},
        stage="both",
        tokens=10 * 64,
        transfer_tokens=4 * 64,
        block_size=32,
        batch_size=2,
        lora=True,
        eval_tokens=64,
        eval_every=3,
        checkpoint_every=2,
        device="cpu",
    )
    return TrainConfig(**{**values, **overrides})


DATA = torch.randint(0, 128, (20 * 32,), generator=torch.Generator().manual_seed(3))
HELD_OUT = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(4))


def train(out, cfg: TrainConfig, *, resume=False, stop_at=None):
    def callback(event):
        if event["event"] == "step" and (event["stage"], event["step"]) == stop_at:
            raise Interrupted

    torch.manual_seed(123)  # the caller's RNG state must not matter on resume
    trainer = Trainer(tiny_model(), cfg, DATA, HELD_OUT, out=out, callback=callback)
    return trainer.fit(resume=resume)


def steps(out) -> list[tuple[str, int, float | None]]:
    """What the metrics say: (stage, step, held-out perplexity) of every step."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"], r.get("eval_ppl")) for r in map(json.loads, lines)]


def assert_same_weights(a: Decoder, b: Decoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [name for name in sa if not torch.equal(sa[name], sb[name])]
    assert not different, f"weights differ after resume: {different}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    return out, train(out, config())


@pytest.mark.parametrize("stop_at", [("transfer", 3), ("finetune", 1), ("finetune", 5)], ids=str)
def test_resume_is_bit_identical(tmp_path, uninterrupted, stop_at):
    reference_dir, reference = uninterrupted
    with pytest.raises(Interrupted):
        train(tmp_path, config(), stop_at=stop_at)
    assert not (tmp_path / "model").exists()
    resumed = train(tmp_path, config(), resume=True)
    assert_same_weights(resumed.model, reference.model)
    assert steps(tmp_path) == steps(reference_dir)


def test_full_finetune_resume_is_bit_identical(tmp_path):
    cfg = config(lora=False, stage="finetune", transfer_tokens=None, tokens=5 * 64)
    reference = train(tmp_path / "a", cfg)
    with pytest.raises(Interrupted):
        train(tmp_path / "b", cfg, stop_at=("finetune", 3))
    resumed = train(tmp_path / "b", cfg, resume=True)
    assert_same_weights(resumed.model, reference.model)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def dies_on_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted("killed while writing")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", dies_on_second_checkpoint)
    with pytest.raises(Interrupted):
        train(tmp_path, config())
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary files left"
    checkpoint = checkpointing.load_checkpoint(tmp_path)
    assert (checkpoint.stage, checkpoint.step) == ("transfer", 2)
    assert checkpoint.params and "optimizer" in checkpoint.state
    # And the run carries on from it.
    resumed = train(tmp_path, config(), resume=True)
    reference = train(tmp_path / "reference", config())
    assert_same_weights(resumed.model, reference.model)


def _snapshot(directory) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_with_a_different_config_is_refused(tmp_path, uninterrupted):
    reference_dir, _ = uninterrupted
    before = _snapshot(reference_dir)
    with pytest.raises(ValueError, match=r"different config: lr=0.5 \(saved: 0.0001\)"):
        train(reference_dir, config(lr=0.5), resume=True)
    assert _snapshot(reference_dir) == before


def test_starting_over_an_existing_run_is_refused(uninterrupted):
    reference_dir, _ = uninterrupted
    before = _snapshot(reference_dir)
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        train(reference_dir, config())
    assert _snapshot(reference_dir) == before


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(tmp_path / "empty", config(), resume=True)


def test_resume_changes_that_do_not_change_the_result_are_allowed(tmp_path):
    with pytest.raises(Interrupted):
        train(tmp_path, config(), stop_at=("finetune", 2))
    train(tmp_path, config(eval_every=1, checkpoint_every=1), resume=True)
