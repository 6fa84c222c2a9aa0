"""``linearize eval harness``: lm-evaluation-harness on our model and our local tasks."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from linearize.cli.options import (
    add_attention_arguments,
    add_quant_argument,
    attention_from_args,
    model_label,
)

METRICS = ("acc", "acc_norm", "perplexity")


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``harness`` to the ``eval`` subcommands."""
    parser = sub.add_parser(
        "harness", help="lm-evaluation-harness tasks (ours: linearize_lambada_*, linearize_cloze_*)"
    )
    parser.add_argument("--model", default="smollm2-135m", help="name, HF dir, .gguf or saved dir")
    # --attention (+ --group-size, --conv-size, --option): linearize, untrained, before scoring
    add_attention_arguments(parser, required=False)
    add_quant_argument(parser)
    parser.add_argument(
        "--tasks",
        help="comma-separated lm-eval tasks or tags (ours: the tag 'linearize' runs all four)",
    )
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    parser.add_argument("--data-dir", help="task data folder (default: <cache>/tasks)")
    parser.add_argument(
        "--write-data", action="store_true", help="write our tasks' data files first"
    )
    parser.add_argument(
        "--examples", type=int, default=None, help="with --write-data: examples per task"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per task")
    parser.add_argument("--out", help="also save a result record in this folder (for bench report)")
    parser.set_defaults(func=run_harness)


def run_harness(args: argparse.Namespace) -> int:
    from linearize.eval.tasks import EXAMPLES, write_task_data

    if args.write_data:
        paths = write_task_data(args.data_dir, args.examples or EXAMPLES)
        if not args.json:
            print(f"wrote {len(paths)} task data files to {paths[0].parent}")
    elif args.examples is not None:
        raise ValueError("--examples applies to --write-data")
    if not args.tasks:
        if args.write_data:
            return 0
        raise ValueError("--tasks is required (e.g. --tasks linearize)")
    try:
        from linearize.eval.harness import evaluate
    except ModuleNotFoundError as e:
        if e.name != "lm_eval":
            raise
        raise RuntimeError("lm-eval is not installed: pip install 'linearize[harness]'") from None

    if args.option and not args.attention:
        raise ValueError(
            "--option on a converted model: save it with the options first (linearize export "
            "--model M --option ... --out D, or linearize.models.reconfigure), then evaluate D"
        )
    start = time.perf_counter()
    out = evaluate(
        args.model,
        [t for t in args.tasks.split(",") if t],
        attention=attention_from_args(args) if args.attention else None,
        quant=args.quant,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        data_dir=args.data_dir,
    )
    seconds = time.perf_counter() - start
    rows = [_row(model_label(args), task, out, seconds) for task in sorted(out["results"])]
    if args.out:
        from linearize.bench import report

        report.save_results(args.out, _stem(args), "harness", rows, _command(args))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'task':<28} {'examples':>8} {'acc':>7} {'acc_norm':>9} {'perplexity':>11}")
    for r in rows:
        cells = [f"{r[m]:.4f}" if r[m] is not None else "—" for m in METRICS]
        print(f"{r['task']:<28} {r['examples']:>8} {cells[0]:>7} {cells[1]:>9} {cells[2]:>11}")
    print(f"model {rows[0]['model']}, {seconds:.1f} s")
    return 0


def _row(model: str, task: str, out: dict[str, Any], seconds: float) -> dict[str, Any]:
    metrics = out["results"][task]
    samples = out.get("n-samples", {}).get(task, {})
    row = {"model": model, "task": task, "examples": samples.get("effective")}
    row.update({m: metrics.get(f"{m},none") for m in METRICS})
    return row | {"seconds": round(seconds, 1)}


def _stem(args: argparse.Namespace) -> str:
    parts = [model_label(args), args.tasks.replace(",", "+")]
    parts += [f"l{args.limit}"] if args.limit else []
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(parts))
    return f"harness-{safe.strip('_')}"


def _command(args: argparse.Namespace) -> str:
    words = [f"linearize eval harness --model {args.model} --tasks {args.tasks}"]
    words += [f" --quant {args.quant}"] if args.quant else []
    if args.attention:
        words.append(f" --attention {args.attention}")
        words += [f" --option {pair}" for pair in args.option]
        words += [f" --group-size {args.group_size}"] if args.group_size else []
        words += [f" --conv-size {args.conv_size}"] if args.conv_size else []
    words += [f" --limit {args.limit}"] if args.limit else []
    words += [f" --num-fewshot {args.num_fewshot}"] if args.num_fewshot is not None else []
    return "".join(words)
