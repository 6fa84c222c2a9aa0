"""``linearize demo``: the main job, on the embedded defaults, no flags needed."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from linearize.cli.options import add_config_arguments, config_from_args
from linearize.demo import DemoConfig, run_demo, summary_rows
from linearize.demo.pipeline import check_out


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="linearize SmolLM2 end to end on this machine: train, speculate, report",
        description="Linearize the embedded SmolLM2-135M with the paper's augmented attention, "
        "train it back on Jane Austen, train Medusa heads, and report perplexity, decode speed, "
        "state memory and speculative decoding against the original. Rerun to resume.",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="where everything goes (default: %(default)s)"
    )
    add_config_arguments(demo, DemoConfig)
    demo.add_argument("--smoke", action="store_true", help="a tiny random model and text: a minute")
    demo.add_argument(
        "--overwrite", action="store_true", help="start over in --out, deleting what it holds"
    )
    demo.set_defaults(func=run)


class _Bars:
    """A tqdm progress bar per training stage, for the trainer's callback events."""

    def __init__(self, name: str) -> None:
        self.name, self.bar = name, None

    def __call__(self, event: dict[str, Any] | int, total: int = 0, metrics=None) -> None:
        """Trainer events (one dict), or Medusa training's ``(step, steps, metrics)``."""
        from tqdm import tqdm

        if not isinstance(event, dict):
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.name, file=sys.stderr)
            self.bar.update(event - self.bar.n)
            return

        if event.get("event") == "stage":
            self.close()
            desc = f"{self.name}: {event['stage']}"
            self.bar = tqdm(
                total=event["steps"], initial=event["first"], desc=desc, file=sys.stderr
            )
            return
        if self.bar is None:
            self.bar = tqdm(desc=self.name, file=sys.stderr)
        if "loss" in event:
            self.bar.set_postfix(loss=f"{event['loss']:.4g}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    out = check_out(args.out, overwrite=args.overwrite)
    if args.smoke:
        from linearize.demo.smoke import prepare

        out.mkdir(parents=True, exist_ok=True)
        config = prepare(out)
        for name in ("device", "quant", "engine"):  # what the smoke run takes from the flags
            setattr(config, name, getattr(args, name))
        config.validate()
    else:
        config = config_from_args(args, DemoConfig)
    start = time.perf_counter()
    bars: list[_Bars] = []

    def progress(name: str) -> _Bars:
        bars.append(_Bars(name))
        return bars[-1]

    try:
        report = run_demo(
            config, out, train_progress=progress, announce=lambda text: print(text, flush=True)
        )
    finally:
        for bar in bars:
            bar.close()
    width = max(len(k) for k, _ in summary_rows(report))
    print()
    for key, value in summary_rows(report):
        print(f"{key:<{width}}  {value}")
    print(f"\nreport: {out / 'report.md'} (took {(time.perf_counter() - start) / 60:.1f} min)")
    print(f"model:  {report.model_dir} (with its Medusa heads)\n")
    print("next:")
    model = report.model_dir
    print(f'  linearize generate --model {model} --prompt "It is a truth" --speculative medusa')
    print(f"  linearize eval ppl --model {model} --data austen:eval --json")
    print(
        "  linearize train --model smollm2-135m --attention augmented --stage both --lora "
        f"--tokens {config.budget * 10} --out runs/bigger"
    )
    return 0
