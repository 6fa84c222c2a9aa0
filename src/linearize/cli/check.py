"""``linearize check causality``: the leakage check anyone can run."""

from __future__ import annotations

import argparse
import dataclasses
import json

from linearize.check import check_all_causality, check_causality
from linearize.config import parse_options
from linearize.layers.config import list_attentions


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser("check", help="checks anyone can run on an attention")
    kinds = check.add_subparsers(dest="check", metavar="CHECK", required=True)
    causality = kinds.add_parser(
        "causality", help="perturb future tokens; report the largest change in earlier outputs"
    )
    causality.add_argument(
        "--attention", default="all", help=f"'all' or one of: {', '.join(list_attentions())}"
    )
    causality.add_argument("--form", default="parallel", help="parallel, chunk or recurrent")
    causality.add_argument("--length", type=int, default=64, help="tokens in the probe sequence")
    causality.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attention option, e.g. --option conv=symmetric",
    )
    causality.add_argument("--json", action="store_true", help="one JSON object per line")
    causality.set_defaults(func=run_causality)


def run_causality(args: argparse.Namespace) -> int:
    if args.attention == "all":
        reports = check_all_causality(form=args.form, length=args.length)
    else:
        options = parse_options(args.option)
        reports = [check_causality(args.attention, form=args.form, length=args.length, **options)]
    for r in reports:
        if args.json:
            print(json.dumps(dataclasses.asdict(r)))
            continue
        extra = ",".join(f"{k}={v}" for k, v in r.options.items() if k == "conv")
        label = r.attention + (f" ({extra})" if extra else "")
        verdict = "LEAKS" if r.leaks else "causal"
        print(f"{label:<28} {r.form:<10} max change {r.max_change:.3e}  {verdict}")
    return 1 if any(r.leaks for r in reports) else 0
