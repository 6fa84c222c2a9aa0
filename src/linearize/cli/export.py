"""``linearize export-hf``: write a model as a transformers directory."""

from __future__ import annotations

import argparse

from linearize.cli.options import (
    add_attention_arguments,
    apply_attention_args,
    attention_from_args,
    parse_layers,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-hf",
        help="write a model as a transformers directory (AutoModelForCausalLM loads it)",
    )
    parser.add_argument("--model", required=True, help="name, HF dir, .gguf or saved dir")
    # --attention (+ --group-size, --conv-size, --option): linearize, untrained, before export
    add_attention_arguments(parser, required=False)
    parser.add_argument("--layers", help="with --attention: comma-separated layer indices")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (new or empty; an existing one only with --overwrite)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out, deleting what it holds"
    )
    parser.add_argument(
        "--drop-medusa",
        action="store_true",
        help="export a model saved with Medusa heads, leaving the heads out",
    )
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from linearize.generation.medusa import load_heads
    from linearize.hf import export_hf
    from linearize.models import linearize, load
    from linearize.models.directory import check_not_source
    from linearize.paths import check_target

    check_not_source(args.out, args.model)  # before any work
    check_target(args.out, overwrite=args.overwrite)
    heads = load_heads(args.model)
    if heads is not None and not args.drop_medusa:
        raise ValueError(
            f"{args.model} has {len(heads)} Medusa heads, which transformers' generate() cannot "
            "use; pass --drop-medusa to export the model without them (they stay in "
            f"{args.model}, for `linearize generate --speculative medusa`)"
        )
    model = load(args.model)
    if args.attention:
        linearize(model, attention_from_args(args), layers=parse_layers(args.layers))
    elif args.layers:
        raise ValueError("--layers needs --attention")
    else:  # --option alone: set on the converted model's layers (e.g. retain=32)
        apply_attention_args(model, args)
    if model.quantization is not None and model.quantization.coded:
        print(f"{model.quantization.quant} weights exported dequantized to float32")
    export_hf(model, args.out, overwrite=args.overwrite)
    if heads is not None:
        print(f"left out {len(heads)} Medusa heads (they stay in {args.model})")
    print(f"exported {args.model} to {args.out}")
    print(
        "load it with: AutoModelForCausalLM.from_pretrained("
        f"{str(args.out)!r}, trust_remote_code=True)  (or `import linearize` first)"
    )
    return 0
