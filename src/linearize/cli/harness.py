"""``linearize eval harness``: lm-evaluation-harness on our model and our local tasks."""

from __future__ import annotations

import argparse
import json
import time

from linearize.cli.options import add_attention_arguments, attention_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``harness`` to the ``eval`` subcommands."""
    parser = sub.add_parser(
        "harness", help="lm-evaluation-harness tasks (ours: linearize_lambada_*, linearize_cloze_*)"
    )
    parser.add_argument("--model", default="smollm2-135m", help="name, HF dir, .gguf or saved dir")
    # --attention (+ --group-size, --conv-size, --option): linearize, untrained, before scoring
    add_attention_arguments(parser, required=False)
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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
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
    from linearize.eval.harness import evaluate

    start = time.perf_counter()
    out = evaluate(
        args.model,
        [t for t in args.tasks.split(",") if t],
        attention=attention_from_args(args) if args.attention else None,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        data_dir=args.data_dir,
    )
    rows = {
        task: {k.removesuffix(",none"): v for k, v in metrics.items() if _is_metric(k, v)}
        for task, metrics in out["results"].items()
    }
    record = {
        "model": args.model,
        "attention": attention_from_args(args) if args.attention else None,
        "limit": args.limit,
        "seconds": round(time.perf_counter() - start, 1),
        "results": rows,
    }
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{'task':<28} {'metric':<12} value")
    for task, metrics in rows.items():
        for metric, value in metrics.items():
            print(f"{task:<28} {metric:<12} {value:.4f}")
    print(f"model {args.model}, attention {record['attention']}, {record['seconds']} s")
    return 0


def _is_metric(key: str, value: object) -> bool:
    return "," in key and "stderr" not in key and isinstance(value, int | float)
