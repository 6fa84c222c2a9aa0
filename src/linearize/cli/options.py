"""Command-line arguments shared by commands: the attention flags, and the flags generated from a
config dataclass's fields."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from linearize.config import parse_options
from linearize.engine import ENGINES
from linearize.engine.step import KV_TYPES
from linearize.layers.config import list_attentions
from linearize.models.quantize import QUANTS


def add_attention_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--attention",
        required=required,
        help=f"registry attention: {', '.join(list_attentions())}",
    )
    parser.add_argument("--group-size", type=int, help="group / window size (attention 'size')")
    parser.add_argument(
        "--conv-size",
        type=int,
        help="causal conv taps per head (turns the conv on V on unless --option conv=... says)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any attention config field, e.g. --option local=relu2 (repeatable); without "
        "--attention, where a command reads a converted model: set on its linear layers, for "
        "options that keep its parameters (retain=32, use_global=false)",
    )


def attention_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The attention spec (name + options) the arguments describe."""
    options = parse_options(args.option)
    if "name" in options:
        raise ValueError("--option name=... is what --attention sets: pass --attention instead")
    if args.group_size is not None:
        options["size"] = args.group_size
    if args.conv_size is not None:
        options["conv_size"] = args.conv_size
        options.setdefault("conv", "causal")
    return {"name": args.attention, **options}


def apply_attention_args(model: Any, args: argparse.Namespace) -> None:
    """``--attention`` linearizes ``model`` (untrained); ``--option`` alone sets options on its
    linear layers, keeping their parameters (``linearize.models.reconfigure``)."""
    from linearize.models import linearize, reconfigure

    if args.attention:
        linearize(model, attention_from_args(args))
    elif args.group_size is not None or args.conv_size is not None:
        raise ValueError("--group-size and --conv-size go with --attention; on a converted "
                         "model set --option size=... instead")  # fmt: skip
    elif args.option:
        reconfigure(model, parse_options(args.option))


def model_label(args: argparse.Namespace) -> str:
    """``model``, ``model+attention`` or ``model+attention(size=128,sinks=0)``, then ``+int4``
    when ``--quant`` quantized it: a result row's name for what was measured."""
    quant = getattr(args, "quant", None)
    quant = f"+{quant}" if quant not in (None, "none") else ""
    if not args.attention:
        options = ",".join(getattr(args, "option", None) or [])
        return args.model + (f"({options})" if options else "") + quant
    options = {k: v for k, v in attention_from_args(args).items() if k != "name"}
    listed = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{args.model}+{args.attention}" + (f"({listed})" if listed else "") + quant


def parsed_by(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a parser raising ``ValueError``: argparse shows its message
    (for a plain ``ValueError`` it would print only the function's name)."""

    def parse_argument(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse_argument


def parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer indices") from None


def _field_type(hint: Any) -> tuple[Any, tuple[Any, ...] | None, bool]:
    """The argparse ``type``, ``choices`` and repeatability of a config field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint), False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _field_type(args[0])
    if typing.get_origin(hint) is list:
        return args[0], None, True
    return hint, None, False


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    choices: dict[str, list[str]] | None = None,
) -> None:
    """One ``--flag`` per field of the dataclass config ``cls`` (but ``skip``), with the field's
    help text and default (à la transformers' ``HfArgumentParser``); list fields repeat."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = field.metadata.get("help", "")
        if default not in (None, []):
            help_text += f" (default: {default})"
        kind, allowed, repeated = _field_type(hints[field.name])
        allowed = (choices or {}).get(field.name, allowed)
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif repeated:
            parser.add_argument(flag, type=kind, action="append", help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, type=kind, choices=allowed, default=default, help=help_text)


def config_from_args(args: argparse.Namespace, cls: type, **values: Any) -> Any:
    """The validated config ``cls`` of the flags ``add_config_arguments`` made; ``values``
    (fields with their own flags) win. Repeatable flags never given keep the field default."""
    for field in dataclasses.fields(cls):
        if field.name not in values and getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    return cls(**values).validate()


def add_quant_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quant",
        choices=list(QUANTS),
        help="quantize the weights as the model loads (int8 / int4: group-wise, groups of 32; "
        "bf16: bfloat16 matmuls); a quantized directory loads as it is without this flag",
    )


def add_engine_argument(parser: argparse.ArgumentParser, kv_type: bool = True) -> None:
    """``--engine`` and (with ``kv_type``) ``--kv-type``."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="torch: the PyTorch reference; onnx: the ONNX Runtime step (pip install "
        "'linearize[fast]'); auto (default): onnx for a quantized model, else torch",
    )
    if not kv_type:
        return
    parser.add_argument(
        "--kv-type",
        choices=list(KV_TYPES),
        help="the onnx engine's keys and values in softmax windows and caches: float32, "
        "float16 (llama.cpp's cache) or int8 (a float32 scale per 32, llama.cpp's q8_0); "
        "default float16 for quantized weights, else float32",
    )
