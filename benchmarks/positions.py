"""Perplexity by position inside windows, models compared window by window:
``python benchmarks/positions.py --model M [--model M2 ...] [--variant retain=0 ...]``.

Every text is cut into ``--windows`` windows of ``--window`` tokens, each scored from a fresh
state (``linearize eval ppl``'s windowed protocol), and every target is grouped by its position
inside its window (``--buckets``, as ``linearize eval ppl --buckets`` without ``--stream``). One
stream puts a few hundred targets in a bucket such as 516–1,024, too few to tell two models
apart by half a percent; here each window gives a paired difference per bucket, and the rows
after the first report their mean difference in NLL against the first row (as a percentage of
perplexity) with its standard error over the windows.

Rows: each ``--model``, then the first model with each ``--variant`` (attention options set on
its linear layers, comma-separated ``K=V``, e.g. ``retain=0`` or ``use_global=false``).
Accuracy does not depend on load: runs may share the machine. Prints a table, or with
``--json`` one object per row.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import linearize
from linearize.config import parse_options
from linearize.data import source_tokens
from linearize.eval.long_context import bucket_perplexity, check_window_buckets, parse_ints
from linearize.models import reconfigure
from linearize.train.perplexity import PerplexityConfig, Span, in_window_positions, perplexity


def _window_means(model, tokens: torch.Tensor, window: int, edges: tuple[int, ...]):
    """``[windows, buckets]`` mean NLL of each window's targets in each bucket."""
    rows: list[torch.Tensor] = []

    def collect(span: Span, nlls: torch.Tensor) -> None:
        buckets = bucket_perplexity(in_window_positions(span, len(nlls)), nlls, edges)
        rows.append(torch.tensor([math.log(b.ppl) for b in buckets], dtype=torch.float64))

    perplexity(model, tokens, PerplexityConfig(window=window), on_targets=collect)
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="repeatable")
    parser.add_argument("--variant", action="append", default=[], help="K=V[,K=V]: repeatable")
    parser.add_argument("--data", action="append", help="default: prideprejudice and mobydick")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=49)
    parser.add_argument("--buckets", default="0,516")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    edges = check_window_buckets(parse_ints(args.buckets, "--buckets"), args.window)
    names = [(m, {}) for m in args.model]
    names += [(args.model[0], parse_options(v.split(","))) for v in args.variant]
    for data in args.data or ["prideprejudice", "mobydick"]:
        means, labels = [], []
        for source, options in names:
            model = linearize.load(source).eval()
            if options:
                reconfigure(model, options)
            tokens = source_tokens(data, model.tokenizer)[: args.windows * args.window]
            means.append(_window_means(model, tokens, args.window, edges))
            labels.append(source + "".join(f" {k}={v}" for k, v in options.items()))
        spans = [f"{a}–{b}" for a, b in zip(edges, [*edges[1:], args.window], strict=True)]
        if not args.json:
            print(f"\n{data}: {len(means[0])} windows of {args.window} tokens")
            print("| row | " + " | ".join(spans) + " |")
            print("|---" * (len(spans) + 1) + "|")
        for label, m in zip(labels, means, strict=True):
            ppl = [math.exp(float(x)) for x in m.mean(0)]  # windows weigh alike
            diff = 100 * (m - means[0])  # ~ % of perplexity for small differences
            delta = diff.mean(0).tolist()
            se = (diff.std(0) / math.sqrt(len(m))).tolist()
            if args.json:
                row = {"data": data, "model": label, "window": args.window, "buckets": spans}
                row |= {"ppl": ppl, "delta_pct": delta, "se_pct": se}
                print(json.dumps(row))
                continue
            cells = [
                f"{p:.3f}" if m is means[0] else f"{p:.3f} ({d:+.2f} ± {s:.2f} %)"
                for p, d, s in zip(ppl, delta, se, strict=True)
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
