"""Two CPU processes (gloo) train to the same weights as one process with the same global batch."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import linearize
from linearize import Decoder, ModelConfig
from linearize.train.config import TrainConfig
from linearize.train.distributed import DistContext
from linearize.train.trainer import Trainer

DATA = torch.randint(0, 128, (24 * 32,), generator=torch.Generator().manual_seed(3))
HELD_OUT = torch.randint(0, 128, (128,), generator=torch.Generator().manual_seed(4))

# Global batch of 4 sequences: 2 per process, one micro-batch each.
RUNS = {
    "ddp-both-lora": dict(stage="both", lora=True, tokens=8 * 128, transfer_tokens=3 * 128),
    "fsdp-finetune-full": dict(stage="finetune", parallel="fsdp", tokens=4 * 128),
    "fsdp-finetune-lora": dict(stage="finetune", parallel="fsdp", lora=True, tokens=4 * 128),
}


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


def run_config(name: str) -> TrainConfig:
    values = dict(
        model="tiny",
        attention="augmented",
        attention_options={"size": 8, "conv": "causal", "conv_size": 4},
        block_size=32,
        batch_size=4,
        micro_batch_size=1,
        eval_tokens=128,
        eval_every=2,
        checkpoint_every=2,
        lr=3e-3,
        device="cpu",
    )
    return TrainConfig(**{**values, **RUNS[name]})


def train(name: str, out) -> dict:
    result = Trainer(tiny_model(), run_config(name), DATA, HELD_OUT, out=out).fit()
    return {"weights": result.model.state_dict(), "evals": result.evals}


class Interrupted(Exception):
    pass


class StopsAtCall(Trainer):
    """Raises on every process at the same micro-batch (2 per step): a killed run."""

    def setup_stage(self, name):
        stage = super().setup_stage(name)
        loss, calls = stage.loss, []

        def stopping(ids, state):
            calls.append(1)
            if len(calls) == 5:  # step 3 of 4, after the checkpoint of step 2
                raise Interrupted
            return loss(ids, state)

        stage.loss = stopping
        return stage


def interrupted_then_resumed(name: str, out) -> dict:
    with contextlib.suppress(Interrupted):
        StopsAtCall(tiny_model(), run_config(name), DATA, HELD_OUT, out=out).fit()
    steps = []
    result = Trainer(
        tiny_model(), run_config(name), DATA, HELD_OUT, out=out, callback=steps.append
    ).fit(resume=True)
    ran = [e["step"] for e in steps if e["event"] == "step"]
    return {"weights": result.model.state_dict(), "evals": result.evals, "ran": ran}


def _worker(rank: int, world_size: int, tmp: str, port: int) -> None:
    # What torchrun / accelerate launch tell each process; the trainer joins the group itself.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        results = {name: train(name, f"{tmp}/{name}") for name in RUNS}
        results["resumed"] = interrupted_then_resumed("fsdp-finetune-lora", f"{tmp}/resumed")
        if rank == 0:
            torch.save(results, f"{tmp}/results.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, str(tmp), port), nprocs=2, join=True)
    return tmp, torch.load(tmp / "results.pt", weights_only=True)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one(tmp_path, two_processes, name):
    tmp, results = two_processes
    reference = train(name, tmp_path / name)
    two = results[name]
    assert two["weights"].keys() == reference["weights"].keys()
    for key, value in reference["weights"].items():
        # Reductions in another order move a gradient by ~1e-7, and Adam can turn a near-zero
        # one into a visible step: atol 1e-4 is far below one step (lr 3e-3), which a real
        # mismatch would show.
        torch.testing.assert_close(two["weights"][key], value, rtol=1e-4, atol=1e-4, msg=key)
    for stage, ppl in reference["evals"].items():
        assert math.isclose(two["evals"][stage], ppl, rel_tol=1e-4), stage
    # The main process alone wrote the metrics, one record per step.
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [
        json.loads(line)["step"]
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]


def test_fsdp_resume_is_exact(two_processes):
    _, results = two_processes
    reference, resumed = results["fsdp-finetune-lora"], results["resumed"]
    assert resumed["ran"] == [3, 4], "the resumed run did not start from the step-2 checkpoint"
    for key, value in reference["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key


def test_batch_must_split_over_processes():
    ctx = DistContext(rank=1, world_size=3)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ctx.share(4)
    assert DistContext(rank=1, world_size=2).share(4) == slice(2, 4)
