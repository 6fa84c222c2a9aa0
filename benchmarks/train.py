"""Training benchmark on SmolLM2-135M: speed of both stages, and the quality they recover.

Speed: training tokens/s of stage 1 (attention transfer) and stage 2 (LoRA fine-tuning) in our
trainer, beside a full fine-tuning step of the same model in transformers (the reference figure
on this 2-core CPU is ~90 tokens/s), all measured in this process on the same batches.

Quality: perplexity on the Austen evaluation slice (the first tokens of *Pride and Prejudice*;
non-overlapping windows of ``--eval-window`` tokens, each scoring all but its first token,
PPL = exp(mean NLL)) of (a) the softmax original, (b) the augmented linearized model after
stage 1 + stage 2 and (c) a plain linear attention (elu) after the same stage 2 (it has no new
parameters, so no stage 1), with the token budget and the time used.

    .venv/bin/python benchmarks/train.py --transfer-tokens 6144 --finetune-tokens 3072

Results go to ``results/train/<timestamp>/`` (runs, metrics, ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import linearize
from linearize.cli.train import ProgressBars
from linearize.data import eval_tokens, source_tokens
from linearize.train import pipeline
from linearize.train.config import TrainConfig
from linearize.train.perplexity import exp_mean, windowed_nll


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transfer-tokens", type=int, default=6144, help="stage 1 tokens")
    p.add_argument("--finetune-tokens", type=int, default=3072, help="stage 2 tokens")
    p.add_argument("--block-size", type=int, default=512, help="training and evaluation window")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=4, help="evaluation windows scored")
    p.add_argument("--eval-window", type=int, default=1024, help="evaluation window (tokens)")
    recipe = TrainConfig()  # the default recipe's learning rates
    p.add_argument("--transfer-lr", type=float, default=recipe.transfer_lr)
    p.add_argument("--lr", type=float, default=recipe.lr, help="stage 2 learning rate")
    p.add_argument("--new-lr", type=float, help="stage 2 lr of alpha/conv taps (default: --lr)")
    p.add_argument("--form", default="parallel", help="attention form while training")
    p.add_argument("--hf-steps", type=int, default=2, help="transformers steps (first: warm-up)")
    p.add_argument(
        "--attention-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra option of the augmented attention (JSON value)",
    )
    p.add_argument(
        "--skip", action="append", default=[], choices=["softmax", "hf", "ours", "augmented", "elu"]
    )
    p.add_argument("--out", default="results/train")
    return p.parse_args()


def evaluate(model, tokens: torch.Tensor, window: int) -> dict:
    started = time.perf_counter()
    with torch.no_grad():
        nll, count = windowed_nll(model, tokens, window, form="parallel")
    return {
        "ppl": exp_mean(nll, count),
        "scored": count,
        "seconds": time.perf_counter() - started,
    }


def hf_full_finetune_speed(args: argparse.Namespace) -> dict:
    """Tokens/s of a full fine-tuning step (forward, backward, AdamW) in transformers."""
    from transformers import AutoModelForCausalLM

    from linearize.models.checkpoint import load_smollm2

    config, weights, tokenizer = load_smollm2()
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = source_tokens("austen", tokenizer)
    T, B = args.block_size, args.batch_size
    times = []
    for step in range(args.hf_steps):
        ids = tokens[step * B * T : (step + 1) * B * T].view(B, T)
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
        print(f"transformers full fine-tune step {step + 1}: {times[-1]:.1f} s", flush=True)
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
    name: str, config: TrainConfig, out: Path, held_out: torch.Tensor, window: int
) -> dict:
    untrained = evaluate(pipeline.build_model(config), held_out, window)
    print(f"{name} before training: {untrained}", flush=True)
    started = time.perf_counter()
    result = pipeline.run(config, out / name, callback=ProgressBars())
    seconds = time.perf_counter() - started
    model = linearize.load(out / name / "model")
    return {
        "config": config.to_dict(),
        "train_seconds": seconds,
        "tokens_per_s": steady_speed(result.metrics, config.tokens_per_step),
        "stage_tokens": config.stage_tokens(),
        "untrained_eval": untrained,
        "eval": evaluate(model, held_out, window),
    }


def main() -> None:
    args = parse_args()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    options = {}
    for pair in args.attention_option:
        key, _, value = pair.partition("=")
        options[key] = json.loads(value)
    results: dict = {"args": vars(args), "threads": torch.get_num_threads()}
    base = linearize.load("smollm2-135m")
    held_out = eval_tokens(base.tokenizer, args.eval_windows * args.eval_window)
    common = dict(
        block_size=args.block_size,
        batch_size=args.batch_size,
        lora=True,
        lr=args.lr,
        new_lr=args.new_lr,
        transfer_lr=args.transfer_lr,
        eval_tokens=0,
        checkpoint_every=0,
        form=args.form,
        device="cpu",
    )
    if "softmax" not in args.skip:
        results["softmax"] = {"eval": evaluate(base, held_out, args.eval_window)}
        print(f"softmax original: {results['softmax']['eval']}", flush=True)
    del base
    if "hf" not in args.skip:
        results["hf_full_finetune"] = hf_full_finetune_speed(args)
    if "ours" not in args.skip:
        # The same full fine-tuning of the softmax model, in our decoder and trainer.
        steps = max(args.hf_steps, 1)
        config = TrainConfig(
            attention=None,
            stage="finetune",
            tokens=steps * args.batch_size * args.block_size,
            **{**common, "lora": False, "lr": 1e-5},
        )
        result = pipeline.run(config, out / "softmax-full", callback=ProgressBars())
        speed = steady_speed(result.metrics, config.tokens_per_step)["finetune"]
        results["ours_full_finetune"] = {"tokens_per_s": speed}
    if "augmented" not in args.skip:
        total = args.transfer_tokens + args.finetune_tokens
        config = TrainConfig(
            attention="augmented",
            attention_options=options,
            stage="both",
            tokens=total,
            transfer_tokens=args.transfer_tokens,
            **common,
        )
        results["augmented"] = train_and_evaluate(
            "augmented", config, out, held_out, args.eval_window
        )
        print(f"augmented: {results['augmented']['eval']}", flush=True)
    if "elu" not in args.skip:
        config = TrainConfig(
            attention="elu", stage="finetune", tokens=args.finetune_tokens, **common
        )
        results["elu"] = train_and_evaluate("elu", config, out, held_out, args.eval_window)
        print(f"elu: {results['elu']['eval']}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, out)


def print_table(results: dict, out: Path) -> None:
    print(
        f"\n{'model':<12} {'stage-1 tok':>11} {'stage-2 tok':>11} {'train s':>8} "
        f"{'stage-1 tok/s':>13} {'stage-2 tok/s':>13} {'ppl before':>10} {'ppl after':>9}"
    )
    for name in ("softmax", "augmented", "elu"):
        if name not in results:
            continue
        r = results[name]
        tokens = r.get("stage_tokens", {})
        speed = r.get("tokens_per_s", {})
        before = r.get("untrained_eval", r["eval"])["ppl"]
        print(
            f"{name:<12} {tokens.get('transfer', 0):>11} {tokens.get('finetune', 0):>11} "
            f"{r.get('train_seconds', 0):>8.0f} {speed.get('transfer', math.nan):>13.1f} "
            f"{speed.get('finetune', math.nan):>13.1f} {before:>10.3f} {r['eval']['ppl']:>9.3f}"
        )
    for key, label in (
        ("hf_full_finetune", "transformers, softmax, full fine-tune"),
        ("ours_full_finetune", "ours, softmax, full fine-tune"),
    ):
        if key in results:
            print(f"{label}: {results[key]['tokens_per_s']:.1f} tokens/s")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
