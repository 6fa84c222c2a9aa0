"""``linearize serve``: an OpenAI-compatible server (FastAPI + uvicorn).

Examples::

    linearize serve --model smollm2-135m --attention augmented        # http://127.0.0.1:8000/v1
    linearize serve --model runs/aug-trained/model --api-key secret --port 8080

Talk to it with the ``openai`` client (``base_url="http://127.0.0.1:8000/v1"``), or curl.
Requests may add ``"speculative": "medusa" | "lookup"`` (lossless speculative decoding); a
model directory's Medusa heads are loaded with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from linearize.cli.options import (
    add_attention_arguments,
    add_config_arguments,
    apply_attention_args,
    config_from_args,
)
from linearize.serve.config import ServeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, ServeConfig, skip=("speculative",))
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: torch's, every core): torch's, and on the engine the rows "
        "stepped at once",
    )
    add_attention_arguments(parser, required=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    import linearize
    from linearize.generation.medusa import load_heads
    from linearize.serve.app import build_app

    config = config_from_args(args, ServeConfig)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model = linearize.load(config.model)
    apply_attention_args(model, args)
    from linearize.models.quantize import apply_quant

    apply_quant(model, None if config.quant == "none" else config.quant, config.model)
    heads = load_heads(config.model) if Path(config.model).is_dir() else None
    app = build_app(model, config, heads)
    print(f"serving {config.model!r} on http://{config.host}:{config.port}/v1", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0
