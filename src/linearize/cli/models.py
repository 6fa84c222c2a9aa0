"""``linearize convert``, ``linearize quantize`` and ``linearize info``."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

from tqdm import tqdm

from linearize.cli.options import add_attention_arguments, attention_from_args, parse_layers
from linearize.models import is_new_parameter, linearize, load
from linearize.models.directory import check_output
from linearize.models.quantize import (
    QUANTS,
    ZERO_POINTS,
    QuantConfig,
    check_unquantized,
    quantize,
    quantized_numel,
    weight_bytes,
)
from linearize.models.wide import DEFAULT_WIDE_SIZE, widen_best

# Tokens GPTQ reads by default: measured on the demo's model, 8,192 gave +1.0 % perplexity at
# int4 against +2.0 % for the nearest codes (docs/results.md).
CALIBRATION_TOKENS = 8192


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert", help="linearize a pretrained model and save it (no training)"
    )
    convert.add_argument("--model", default="smollm2-135m", help="name, HF dir, .gguf or dir")
    add_attention_arguments(convert)
    convert.add_argument("--layers", help="comma-separated layer indices (default: all)")
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not our model"
    )
    convert.add_argument(
        "--wide-layers",
        type=int,
        default=0,
        help="sliding-window layers given a wide window, chosen by recall probes (a few "
        "minutes for SmolLM2; `linearize train` does this by default) (default: 0)",
    )
    convert.add_argument(
        "--wide-size",
        type=int,
        default=DEFAULT_WIDE_SIZE,
        help="window of the wide layers in tokens (0: the model's trained positions minus the "
        f"sinks) (default: {DEFAULT_WIDE_SIZE})",
    )
    convert.set_defaults(func=run_convert)

    quant = subparsers.add_parser(
        "quantize",
        help="quantize a model's weights group-wise (int8 / int4) and save it",
        description="Every linear layer and the embedding / LM head, groups of 32 along the "
        "input, the codes chosen by GPTQ on --calibration text. The output directory loads "
        "like any model (no --quant needed).",
    )
    quant.add_argument("--model", required=True, help="fp model: name, HF dir, .gguf or dir")
    quant.add_argument(
        "--quant", required=True, choices=[q for q, b in QUANTS.items() if b], help="bit width"
    )
    quant.add_argument("--out", required=True, help="output directory (written atomically)")
    quant.add_argument(
        "--zero-points",
        choices=ZERO_POINTS,
        default="auto",
        help="int4 zero points: integer (onnxruntime's MatMulNBits reads them itself), float "
        "(GGUF Q4_1's grid: Q4_1 weights re-quantize losslessly, and the engine adds an "
        "offset term to every linear, ~11%% of a decode step) or auto (default: float for a "
        "model whose weights lie on Q4_1's grid, such as one from a Q4_1 GGUF, else integer)",
    )
    quant.add_argument(
        "--calibration",
        default="austen",
        help="text the codes are fitted to with GPTQ: a built-in corpus (its training part, never "
        "the evaluation slice) or a .txt/.md/.jsonl file or folder; none: the nearest code of "
        "each weight (default: austen)",
    )
    quant.add_argument(
        "--calibration-tokens",
        type=int,
        default=CALIBRATION_TOKENS,
        help=f"tokens of --calibration read (default: {CALIBRATION_TOKENS})",
    )
    quant.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not our model"
    )
    quant.set_defaults(func=run_quantize)

    info = subparsers.add_parser("info", help="describe a model: layers, parameters, state size")
    info.add_argument("model", help="name, HF dir, .gguf or saved directory")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)


def run_convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    for name in ("wide_layers", "wide_size"):  # before the model loads
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_output(args.out, overwrite=args.overwrite, source=args.model)
    model = load(args.model)
    linearize(model, attention_from_args(args), layers=parse_layers(args.layers), keep_trained=True)
    if args.wide_layers:
        wide = widen_best(model, args.wide_layers, args.wide_size)
        if not wide:
            raise ValueError(
                f"--wide-layers {args.wide_layers}: no layer of this {args.attention} model has "
                f"a sliding window that --wide-size {args.wide_size} widens"
            )
        print(f"wide layers: {','.join(map(str, wide))}")
    model.save(args.out, overwrite=args.overwrite)
    print(f"converted {args.model} with {args.attention} in {time.perf_counter() - start:.1f} s")
    print(f"saved to {args.out}; next: linearize info {args.out}")
    return 0


def zero_points(config: QuantConfig) -> str:
    """The int4 zero points, as ``quantize`` reports them ("" for other widths)."""
    if config.bits != 4:
        return ""
    grid = {"float": "Q4_1's float", "integer": "whole"}[config.zero_points]
    return f", {grid} zero points"


def run_quantize(args: argparse.Namespace) -> int:
    from linearize.generation.medusa import load_heads, save_with_heads

    start = time.perf_counter()
    check_output(args.out, overwrite=args.overwrite, source=args.model)
    if args.calibration_tokens < 2:
        raise ValueError(f"--calibration-tokens must be >= 2, got {args.calibration_tokens}")
    model = load(args.model)
    before = weight_bytes(model)
    check_unquantized(model, args.model)  # before any calibration is read or progress drawn
    calibration = _calibration(args, model)
    with tqdm(file=sys.stderr, leave=False) as bar:
        stages: list[str] = []

        def progress(stage: str, done: int, total: int) -> None:
            if stages[-1:] != [stage]:  # a new stage: calibration blocks, then weights coded
                stages.append(stage)
                bar.set_description(stage, refresh=False)
                bar.reset(total)  # (redraws the bar, with its new name)
            bar.update(done - bar.n)

        config = dataclasses.replace(QuantConfig.named(args.quant), zero_points=args.zero_points)
        quantize(model, config, calibration=calibration, progress=progress)
    heads = load_heads(args.model)  # None: not a directory, or one without heads
    if heads is None:
        model.save(args.out, overwrite=args.overwrite)
    else:  # the model's Medusa heads come along as they are (they verify any weights exactly)
        save_with_heads(model, heads, args.out, overwrite=args.overwrite)
    print(
        f"quantized {args.model} to {args.quant} ({model.quantization.method} codes"
        f"{zero_points(model.quantization)}) in "
        f"{time.perf_counter() - start:.1f} s: "
        f"weights {before / 2**20:,.1f} MiB -> {weight_bytes(model) / 2**20:,.1f} MiB"
        + (f"; its {len(heads)} Medusa heads kept as they were" if heads is not None else "")
    )
    print(f"saved to {args.out}; next: linearize generate --model {args.out} --prompt ...")
    return 0


def _calibration(args: argparse.Namespace, model):
    """The first ``--calibration-tokens`` of ``--calibration``'s training part (None: none)."""
    if args.calibration == "none":
        return None
    from linearize.data.tokens import split_tokens

    if model.tokenizer is None:
        raise ValueError(
            f"{args.model} has no tokenizer, so it cannot read --calibration "
            f"{args.calibration}: pass --calibration none (nearest codes)"
        )
    tokens, _ = split_tokens(args.calibration, model.tokenizer)
    if len(tokens) < args.calibration_tokens:
        raise ValueError(
            f"--calibration-tokens {args.calibration_tokens}: {args.calibration}'s training part "
            f"has {len(tokens)} tokens"
        )
    return tokens[: args.calibration_tokens]


def _layer_kind(model, i: int) -> dict:
    """Layer ``i``'s attention name, and its window when it has a sliding one (wide layers show)."""
    config = model.config.attention_config(i)
    if config.window == "sliding" and config.size > 0:
        return {"attention": config.name, "window": config.size}
    return {"attention": config.name}


def describe(model) -> dict:
    kinds = [_layer_kind(model, i) for i in range(model.config.num_layers)]
    runs = []
    index = 0
    for _, group in itertools.groupby(kinds, key=lambda kind: tuple(kind.items())):
        group = list(group)
        last = index + len(group) - 1
        runs.append({"layers": f"{index}-{last}" if last > index else f"{index}", **group[0]})
        index += len(group)
    params = dict(model.named_parameters())
    new = sum(p.numel() for n, p in params.items() if is_new_parameter(n))
    c = model.config
    return {
        "architecture": c.architecture,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "heads": f"{c.num_heads} query / {c.num_kv_heads} key-value, head dim {c.head_dim}",
        "vocab_size": c.vocab_size,
        "attention": runs,
        "parameters": sum(p.numel() for p in params.values()) + quantized_numel(model),
        "quantization": None if model.quantization is None else model.quantization.quant,
        "weight_bytes": weight_bytes(model),
        "new_parameters": new,
        "state_bytes_1k": model.state_nbytes(1024),
        "state_bytes_32k": model.state_nbytes(32768),
    }


def run_info(args: argparse.Namespace) -> int:
    summary = describe(load(args.model))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"architecture   {summary['architecture']}, {summary['layers']} layers, "
        f"hidden {summary['hidden_size']}, {summary['heads']}, vocab {summary['vocab_size']}"
    )
    for run in summary["attention"]:
        window = f" (window {run['window']:,})" if "window" in run else ""
        print(f"layers {run['layers']:<8} {run['attention']}{window}")
    print(f"parameters     {summary['parameters']:,} ({summary['new_parameters']:,} new)")
    quant = summary["quantization"] or "none (fp)"
    print(f"weights        {summary['weight_bytes'] / 2**20:,.1f} MiB, quantization {quant}")
    for key, label in (("state_bytes_1k", "1k"), ("state_bytes_32k", "32k")):
        print(f"state at {label:<5} {summary[key] / 2**20:,.2f} MiB")
    return 0
