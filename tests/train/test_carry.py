"""Training with carried state: blocks read in order, each continuing its stream's state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from linearize.data import StreamSampler
from linearize.models.state import detach_state, state_from_dict, state_to_dict
from linearize.train.losses import next_token_nll
from linearize.train.trainer import Trainer
from tests.train.test_resume import Interrupted, assert_same_weights, config
from tests.train.test_resume import train as train_run
from tests.train.test_trainer import tiny_config, tiny_model, tokens


def test_streams_read_consecutive_blocks_and_start_over_together():
    sampler = StreamSampler(n_blocks=11, streams=3)  # spans of 3; blocks 9 and 10 unread
    assert [sampler.blocks(s) for s in range(4)] == [[0, 3, 6], [1, 4, 7], [2, 5, 8], [0, 3, 6]]
    assert [sampler.starts(s) for s in range(7)] == [True, False, False, True, False, False, True]


@pytest.mark.parametrize(
    ("n_blocks", "streams", "match"),
    [(2, 3, "2 blocks cannot feed 3 streams"), (4, 0, "streams must be >= 1")],
)
def test_stream_sampler_rejects_bad_sizes(n_blocks, streams, match):
    with pytest.raises(ValueError, match=match):
        StreamSampler(n_blocks, streams)


class Recording(Trainer):
    """Records every finetune micro-batch: its ids, the position of the state it continues and
    its summed next-token loss."""

    def setup_stage(self, name):
        stage = super().setup_stage(name)
        loss, self.calls = stage.loss, []

        def recorded(ids, state):
            value, parts, new_state = loss(ids, state)
            total = float(value.detach()) * self.config.batch_size * (ids.shape[1] - 1)
            pos = 0 if state is None else state.pos
            self.calls.append({"ids": ids, "pos": pos, "loss": total})
            return value, parts, new_state

        stage.loss = recorded
        return stage


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["kept", "recomputed"])
def test_each_block_continues_its_streams_state_exactly(gradient_checkpointing):
    # 24 blocks of 32 in 2 streams (spans of 12), one per micro-batch; a learning rate too small
    # to move a weight, so that each stream's text so far in one pass is the reference.
    data = tokens(24 * 32)
    config = tiny_config(
        carry_state=True,
        tokens=5 * 2 * 32,
        batch_size=2,
        micro_batch_size=1,
        gradient_checkpointing=gradient_checkpointing,
    )
    trainer = Recording(tiny_model(), dataclasses.replace(config, lr=1e-30), data)
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    moved = max((p - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert moved < 1e-20
    blocks = data.view(24, 32)
    for stream in range(2):
        calls = trainer.calls[stream::2]
        text = torch.cat([call["ids"] for call in calls], dim=1)
        with torch.no_grad():
            logits, _ = trainer.model(text)
        for step, call in enumerate(calls):
            assert torch.equal(call["ids"][0], blocks[12 * stream + step])
            assert call["pos"] == 32 * step
            part = slice(32 * step, 32 * (step + 1))
            reference = float(next_token_nll(logits[:, part], text[:, part]))
            assert call["loss"] == pytest.approx(reference, rel=1e-5)


def test_streams_start_over_with_a_fresh_state():
    config = tiny_config(carry_state=True, tokens=5 * 32, batch_size=1, micro_batch_size=1)
    trainer = Recording(tiny_model(), config, tokens(2 * 32 + 10))  # a span of 2 blocks
    trainer.fit()
    assert [call["pos"] for call in trainer.calls] == [0, 32, 0, 32, 0]


def test_carried_resume_is_bit_identical(tmp_path):
    # Finetune 6 steps of 2 streams (spans of 10), checkpoints every 2: stopped after step 3,
    # the run resumes from step 2 with the states the streams carried there.
    cfg = config(carry_state=True)
    reference = train_run(tmp_path / "a", cfg)
    with pytest.raises(Interrupted):
        train_run(tmp_path / "b", cfg, stop_at=("finetune", 3))
    resumed = train_run(tmp_path / "b", cfg, resume=True)
    assert_same_weights(resumed.model, reference.model)


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    _, state = model(tokens(40).view(1, 40))
    torch.save(state_to_dict(detach_state(state)), tmp_path / "state.pt")
    loaded = state_from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    ids = tokens(5, seed=2).view(1, 5)
    torch.testing.assert_close(model(ids, state=loaded)[0], model(ids, state=state)[0])
    assert loaded.pos == state.pos == 40


def test_carry_state_refuses_a_growing_state():
    config = tiny_config(carry_state=True, attention=None, attention_options={})
    with pytest.raises(ValueError, match=r"layers \[0, 1\] are softmax"):
        Trainer(tiny_model(attention=None), config, tokens())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"stage": "transfer"}, "carry_state applies to the finetune stage"),
        ({"batch_size": 4, "tokens": 4 * 32}, "2 blocks cannot feed 4 streams"),
    ],
)
def test_carry_state_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        config = tiny_config(carry_state=True, **overrides)
        Trainer(tiny_model(), config, tokens(2 * 32 + 5))


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_windows_longer_than_a_block_suggest_gradient_checkpointing(caplog, gradient_checkpointing):
    attention = {"name": "augmented", "size": 40}
    config = tiny_config(carry_state=True, gradient_checkpointing=gradient_checkpointing)
    with caplog.at_level("WARNING", logger="linearize.train.trainer"):
        Trainer(tiny_model(attention=attention), config, tokens())
    if gradient_checkpointing:
        assert "carry windows" not in caplog.text
    else:
        assert "layers [0, 1] carry windows of up to" in caplog.text
