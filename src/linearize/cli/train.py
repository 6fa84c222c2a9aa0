"""``linearize train``: attention transfer, then LoRA or full fine-tuning.

Example::

    linearize train --model smollm2-135m --attention augmented --stage both --data austen \\
        --tokens 49152 --out runs/augmented --lora

Under ``torchrun --nproc-per-node N -m linearize train ...`` (or ``accelerate launch``) the same
command trains data-parallel; ``--batch-size`` is the global batch.
"""

from __future__ import annotations

import argparse
from typing import Any

from linearize.cli.options import (
    add_attention_arguments,
    add_config_arguments,
    attention_from_args,
    config_from_args,
    parse_layers,
)
from linearize.train.config import TrainConfig

# Fields with their own flags (options.py) or set from several flags.
SPECIAL = ("model", "attention", "attention_options", "layers")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a linearized model: attention transfer, then LoRA or full fine-tuning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="model name or path")
    add_attention_arguments(parser, required=False)
    parser.add_argument("--layers", help="comma-separated layers to linearize (default: all)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics, model)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in --out, deleting what it holds"
    )
    add_config_arguments(parser, TrainConfig, skip=SPECIAL)
    parser.set_defaults(func=run)


def train_config(args: argparse.Namespace) -> TrainConfig:
    if args.attention is None:
        args.attention = TrainConfig().attention
    spec = attention_from_args(args)
    return config_from_args(
        args,
        TrainConfig,
        model=args.model,
        attention=spec.pop("name"),
        attention_options=spec,
        layers=parse_layers(args.layers),
    )


class ProgressBars:
    """A tqdm bar per stage with loss, tokens/s and the last evaluation's perplexity."""

    def __init__(self) -> None:
        self.bar = None
        self.ppl = None

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if event["event"] == "stage":
            self.close()
            self.bar = tqdm(total=event["steps"], initial=event["first"], desc=event["stage"])
            return
        if event.get("eval_ppl") is not None:
            self.ppl = event["eval_ppl"]
        postfix = {"loss": f"{event['loss']:.4g}", "tok/s": f"{event['tokens_per_s']:.0f}"}
        if self.ppl is not None:
            postfix["ppl"] = f"{self.ppl:.2f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    from linearize.train.pipeline import run as train

    config = train_config(args)
    bars = ProgressBars()
    try:
        result = train(
            config, args.out, resume=args.resume, overwrite=args.overwrite, callback=bars
        )
    finally:
        bars.close()
    if result.model_dir is None:
        return 0  # not the main process
    for stage, ppl in result.evals.items():
        speed = result.tokens_per_s.get(stage)
        speed_text = f", {speed:.0f} tokens/s" if speed else ""
        ppl_text = "not evaluated (no held-out tokens)" if ppl is None else f"{ppl:.3f}"
        print(f"{stage}: held-out perplexity {ppl_text}{speed_text}")
    print(f"model: {result.model_dir}")
    print(f"metrics: {result.metrics}")
    return 0
