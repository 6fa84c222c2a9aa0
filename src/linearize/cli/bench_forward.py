"""``linearize bench forward``: the softmax model vs its linearized twin (and transformers):
prefill tokens/s, decode latency, state size and peak RSS."""

from __future__ import annotations

import argparse
import json
import sys

from linearize.bench import forward
from linearize.cli.options import add_config_arguments, config_from_args


def register(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser(
        "forward", help="teacher vs linearized model: prefill, decode latency, peak RSS"
    )
    add_config_arguments(parser, forward.ForwardBenchConfig)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, forward.ForwardBenchConfig)
    rows = forward.bench_forward(
        config, progress=lambda message: print(f"… {message}", file=sys.stderr, flush=True)
    )
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(forward.markdown_table(rows))
    return 0
