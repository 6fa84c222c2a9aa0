"""Training benchmark on SmolLM2-135M: speed of both stages, and the quality they recover.

Speed: training tokens/s of stage 1 (attention transfer) and stage 2 (LoRA fine-tuning) in our
trainer, beside a full fine-tuning step of the same model in transformers (the reference figure
on this 2-core CPU is ~90 tokens/s), all measured in this process on the same batches.

Quality: perplexity on the Austen evaluation slice (the first tokens of *Pride and Prejudice*;
non-overlapping windows of ``eval_window`` tokens, each scoring all but its first token,
PPL = exp(mean NLL)) of (a) the softmax original, (b) the augmented linearized model after
stage 1 + stage 2 and (c) a plain linear attention (elu) after the same stage 2 (it has no new
parameters, so no stage 1), with the token budget and the time used.

Results go to ``<out>/<timestamp>/`` (runs, metrics, ``results.json``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linearize.config import Config, option, parse_options
from linearize.data import source_tokens
from linearize.models import load
from linearize.train import pipeline
from linearize.train.config import TrainConfig
from linearize.train.perplexity import exp_mean, windowed_nll
from linearize.train.trainer import Callback

logger = logging.getLogger(__name__)

PARTS = ("softmax", "hf", "ours", "augmented", "elu")
_RECIPE = TrainConfig()  # the default recipe's learning rates


@dataclass
class TrainBenchConfig(Config):
    """What ``linearize bench train`` measures."""

    transfer_tokens: int = option("stage 1 tokens", 6144)
    finetune_tokens: int = option("stage 2 tokens", 3072)
    block_size: int = option("training and evaluation window", 512)
    batch_size: int = option("sequences per optimizer step", 1)
    eval_windows: int = option("evaluation windows scored", 4)
    eval_window: int = option("evaluation window (tokens)", 1024)
    transfer_lr: float = option("stage 1 learning rate", _RECIPE.transfer_lr)
    lr: float = option("stage 2 learning rate", _RECIPE.lr)
    new_lr: float | None = option("stage 2 lr of alpha/conv taps (default: --lr)", None)
    form: str = option("attention form while training", "parallel")
    hf_steps: int = option("transformers steps (first: warm-up)", 2)
    attention_option: list[str] = option(
        "extra option of the augmented attention, KEY=VALUE (JSON value)", factory=list
    )
    skip: list[str] = option(f"parts to skip: {', '.join(PARTS)}", factory=list)
    out: str = option("results folder", "results/train")
    model: str = option("the softmax model (name or path)", "smollm2-135m")
    data: str = option("training text (see `linearize train --data`)", "austen")
    eval_data: str = option(
        "held-out text: 'austen:eval' (Pride and Prejudice) or a file", "austen:eval"
    )

    def validate(self) -> TrainBenchConfig:
        unknown = sorted(set(self.skip) - set(PARTS))
        if unknown:
            raise ValueError(f"skip {unknown}: allowed {list(PARTS)}")
        positive = ("transfer_tokens", "finetune_tokens", "block_size", "batch_size")
        for name in (*positive, "eval_windows", "eval_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.attention_options()
        return self

    def attention_options(self) -> dict[str, Any]:
        """The ``attention_option`` pairs as a dict (JSON values)."""
        return parse_options(self.attention_option, "--attention-option")


def evaluate(model, tokens: torch.Tensor, window: int) -> dict:
    """Perplexity of ``model`` on ``tokens`` in windows of ``window``, with the time it took."""
    started = time.perf_counter()
    with torch.no_grad():
        nll, count = windowed_nll(model, tokens, window, form="parallel")
    return {
        "ppl": exp_mean(nll, count),
        "scored": count,
        "seconds": time.perf_counter() - started,
    }


def hf_full_finetune_speed(config: TrainBenchConfig, report: Callable[[str], None]) -> dict:
    """Tokens/s of a full fine-tuning step (forward, backward, AdamW) in transformers."""
    from transformers import AutoModelForCausalLM

    from linearize.models.checkpoint import load_smollm2

    hf_config, weights, tokenizer = load_smollm2()
    model = AutoModelForCausalLM.from_config(hf_config)
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = source_tokens(config.data, tokenizer)
    T, B = config.block_size, config.batch_size
    times = []
    for step in range(config.hf_steps):
        ids = tokens[step * B * T : (step + 1) * B * T].view(B, T)
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
        report(f"transformers full fine-tune step {step + 1}: {times[-1]:.1f} s")
    timed = times[1:] or times
    return {"tokens_per_s": B * T * len(timed) / sum(timed), "steps": len(timed)}


def steady_speed(metrics: Path, tokens_per_step: int) -> dict[str, float]:
    """Tokens/s of each stage over its steps after the first (the first one warms up)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    speeds = {}
    for stage in dict.fromkeys(r["stage"] for r in records):
        steps = [r for r in records if r["stage"] == stage]
        timed = steps[1:] or steps
        seconds = sum(tokens_per_step / r["tokens_per_s"] for r in timed)
        speeds[stage] = tokens_per_step * len(timed) / seconds
    return speeds


def train_and_evaluate(
    name: str,
    config: TrainConfig,
    out: Path,
    held_out: torch.Tensor,
    window: int,
    callback: Callback | None,
    report: Callable[[str], None],
) -> dict:
    """Train ``config`` into ``out/name`` and score the model before and after."""
    untrained = evaluate(pipeline.build_model(config), held_out, window)
    report(f"{name} before training: {untrained}")
    started = time.perf_counter()
    result = pipeline.run(config, out / name, callback=callback)
    seconds = time.perf_counter() - started
    model = load(out / name / "model")
    return {
        "config": config.to_dict(),
        "train_seconds": seconds,
        "tokens_per_s": steady_speed(result.metrics, config.tokens_per_step),
        "stage_tokens": config.stage_tokens(),
        "untrained_eval": untrained,
        "eval": evaluate(model, held_out, window),
    }


def bench_train(
    config: TrainBenchConfig,
    *,
    callback: Callback | None = None,
    report: Callable[[str], None] = lambda message: None,
) -> tuple[dict, Path]:
    """The results (also written to ``<out>/<timestamp>/results.json``) and that folder.
    ``callback`` follows each training run (see ``pipeline.run``); ``report`` gets a line per
    finished part."""
    out = Path(config.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    options = config.attention_options()
    results: dict = {"args": config.to_dict(), "threads": torch.get_num_threads()}
    base = load(config.model)
    n = config.eval_windows * config.eval_window
    held_out = source_tokens(config.eval_data, base.tokenizer)[:n]
    if len(held_out) < n:
        raise ValueError(f"eval_data {config.eval_data!r} has {len(held_out)} tokens; {n} needed")
    common = dict(
        model=config.model,
        data=config.data,
        block_size=config.block_size,
        batch_size=config.batch_size,
        lora=True,
        lr=config.lr,
        new_lr=config.new_lr,
        transfer_lr=config.transfer_lr,
        eval_tokens=0,
        checkpoint_every=0,
        form=config.form,
        device="cpu",
    )
    window = config.eval_window
    if "softmax" not in config.skip:
        results["softmax"] = {"eval": evaluate(base, held_out, window)}
        report(f"softmax original: {results['softmax']['eval']}")
    del base
    if "hf" not in config.skip:
        results["hf_full_finetune"] = hf_full_finetune_speed(config, report)
    if "ours" not in config.skip:
        # The same full fine-tuning of the softmax model, in our decoder and trainer.
        steps = max(config.hf_steps, 1)
        train = TrainConfig(
            attention=None,
            stage="finetune",
            tokens=steps * config.batch_size * config.block_size,
            **{**common, "lora": False, "lr": 1e-5},
        )
        result = pipeline.run(train, out / "softmax-full", callback=callback)
        speed = steady_speed(result.metrics, train.tokens_per_step)["finetune"]
        results["ours_full_finetune"] = {"tokens_per_s": speed}
    if "augmented" not in config.skip:
        train = TrainConfig(
            attention="augmented",
            attention_options=options,
            stage="both",
            tokens=config.transfer_tokens + config.finetune_tokens,
            transfer_tokens=config.transfer_tokens,
            **common,
        )
        results["augmented"] = train_and_evaluate(
            "augmented", train, out, held_out, window, callback, report
        )
        report(f"augmented: {results['augmented']['eval']}")
    if "elu" not in config.skip:
        train = TrainConfig(
            attention="elu", stage="finetune", tokens=config.finetune_tokens, **common
        )
        results["elu"] = train_and_evaluate("elu", train, out, held_out, window, callback, report)
        report(f"elu: {results['elu']['eval']}")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results, out


def summary(results: dict, out: Path) -> str:
    """The results as a fixed-width table, with the full fine-tuning speeds."""
    lines = [
        f"\n{'model':<12} {'stage-1 tok':>11} {'stage-2 tok':>11} {'train s':>8} "
        f"{'stage-1 tok/s':>13} {'stage-2 tok/s':>13} {'ppl before':>10} {'ppl after':>9}"
    ]
    for name in ("softmax", "augmented", "elu"):
        if name not in results:
            continue
        r = results[name]
        tokens = r.get("stage_tokens", {})
        speed = r.get("tokens_per_s", {})
        before = r.get("untrained_eval", r["eval"])["ppl"]
        lines.append(
            f"{name:<12} {tokens.get('transfer', 0):>11} {tokens.get('finetune', 0):>11} "
            f"{r.get('train_seconds', 0):>8.0f} {speed.get('transfer', math.nan):>13.1f} "
            f"{speed.get('finetune', math.nan):>13.1f} {before:>10.3f} {r['eval']['ppl']:>9.3f}"
        )
    for key, label in (
        ("hf_full_finetune", "transformers, softmax, full fine-tune"),
        ("ours_full_finetune", "ours, softmax, full fine-tune"),
    ):
        if key in results:
            lines.append(f"{label}: {results[key]['tokens_per_s']:.1f} tokens/s")
    lines.append(f"results: {out / 'results.json'}")
    return "\n".join(lines)
