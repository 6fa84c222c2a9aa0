"""Command-line arguments shared by commands that pick an attention."""

from __future__ import annotations

import argparse
import json
from typing import Any

from linearize.layers.config import list_attentions


def add_attention_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--attention",
        required=required,
        help=f"registry attention: {', '.join(list_attentions())}",
    )
    parser.add_argument("--group-size", type=int, help="group / window size (attention 'size')")
    parser.add_argument("--conv-size", type=int, help="causal conv taps per head")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any attention config field, e.g. --option local=relu2 (repeatable)",
    )


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def attention_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The attention spec (name + options) the arguments describe."""
    options = parse_options(args.option)
    if args.group_size is not None:
        options["size"] = args.group_size
    if args.conv_size is not None:
        options["conv_size"] = args.conv_size
    return {"name": args.attention, **options}


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer indices") from None
