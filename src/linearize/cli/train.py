"""``linearize train``: attention transfer, then LoRA or full fine-tuning.

Example::

    linearize train --model smollm2-135m --attention augmented --stage both --data austen \\
        --tokens 49152 --out runs/augmented --lora

Under ``torchrun --nproc-per-node N -m linearize train ...`` (or ``accelerate launch``) the same
command trains data-parallel; ``--batch-size`` is the global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from linearize.cli.options import add_attention_arguments, attention_from_args, parse_layers
from linearize.train.config import TrainConfig

# Fields with their own flags (options.py) or set from several flags.
SPECIAL = ("model", "attention", "attention_options", "layers")


def _field_type(hint: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """The argparse ``type`` and ``choices`` of a config field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _field_type(args[0])
    return hint, None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field, with its help text and default."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in SPECIAL:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = field.metadata.get("help", "")
        if default is not None:
            help_text += f" (default: {default})"
        kind, choices = _field_type(hints[field.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, help=help_text)


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
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in SPECIAL and getattr(args, f.name) is not None
    }
    values["model"] = args.model
    if args.attention is None:
        args.attention = TrainConfig().attention
    spec = attention_from_args(args)
    values["attention"] = spec.pop("name")
    values["attention_options"] = spec
    values["layers"] = parse_layers(args.layers)
    return TrainConfig(**values).validate()


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

    config = config_from_args(args)
    bars = ProgressBars()
    try:
        result = train(config, args.out, resume=args.resume, callback=bars)
    finally:
        bars.close()
    if result.model_dir is None:
        return 0  # not the main process
    for stage, ppl in result.evals.items():
        speed = result.tokens_per_s.get(stage)
        speed_text = f", {speed:.0f} tokens/s" if speed else ""
        print(f"{stage}: held-out perplexity {ppl:.3f}{speed_text}")
    print(f"model: {result.model_dir}")
    print(f"metrics: {result.metrics}")
    return 0
