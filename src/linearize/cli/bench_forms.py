"""``linearize bench forms``: time and peak memory of one attention layer's forms by length."""

from __future__ import annotations

import argparse
import json
import os
import sys

from linearize.bench import forms
from linearize.cli.options import add_config_arguments, config_from_args


def register(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser(
        "forms", help="parallel, chunk and recurrent forms of one layer vs softmax, by length"
    )
    add_config_arguments(parser, forms.FormsBenchConfig)
    parser.add_argument("--json", action="store_true", help="also print one JSON object per row")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, forms.FormsBenchConfig)
    load = os.getloadavg()[0]
    rows = forms.bench_forms(
        config, on_row=lambda row: print(forms.markdown_row(row), file=sys.stderr, flush=True)
    )
    print(f"{config.threads} thread(s), load average {load:.1f} at start\n")
    print(forms.HEADER)
    for row in rows:
        print(forms.markdown_row(row))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    forms.plot(rows, config.plot)
    print(f"\nplot: {config.plot}")
    return 0
