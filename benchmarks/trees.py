"""Verification on the engine, by tree shape: ``python benchmarks/trees.py --model DIR``.

One quantized (or any) saved model, one engine, one thread by default. After a prompt of
``--context`` tokens, each row times ``forward_tree`` (state restored after each pass) for a
chain of N tokens (a draft, a lookup, a prefill chunk: the chain graph) and for a Medusa-shaped
tree of N nodes (random parents with 4 roots: the tree graph); then a prompt of ``--prefill``
tokens through the engine's chains of 64 against the PyTorch reference. Prints one JSON object
per row; measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from linearize.bench.speed import _random_ids
from linearize.engine.onnx import OnnxEngine
from linearize.models.io import load
from linearize.ops.tree import Tree


def _medusa_shaped(n: int, roots: int = 4, seed: int = 1) -> Tree:
    """``n`` nodes, the first ``roots`` children of the state, each later one of an earlier."""
    g = np.random.default_rng(seed)
    parents = [-1] * min(roots, n) + [int(g.integers(0, i)) for i in range(roots, n)]
    return Tree.from_parents(parents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="saved model directory")
    parser.add_argument("--context", type=int, default=900)
    parser.add_argument("--sizes", default="16,64", help="tree sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--prefill", type=int, default=1024, help="0: no prefill rows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    ids = _random_ids(model, args.context + max(sizes)).reshape(-1).tolist()
    engine = OnnxEngine(model, max_context=8192, threads=args.threads)
    engine.prefill(ids[: args.context])
    for shape in ("chain", "tree"):
        for n in sizes:
            tree = Tree.from_parents([-1, *range(n - 1)]) if shape == "chain" else _medusa_shaped(n)
            tokens = ids[args.context : args.context + n]
            seconds = []
            for _ in range(args.repeats):
                saved = engine.snapshot()
                start = time.perf_counter()
                engine.forward_tree(tokens, tree)
                seconds.append(time.perf_counter() - start)
                engine.restore(saved)
            row = {"shape": shape, "nodes": n, "context": args.context, "threads": args.threads}
            # The first pass exports the graph (once per model) and loads it: not counted.
            row["ms"] = round(1000 * statistics.median(seconds[1:]), 1)
            print(json.dumps(row), flush=True)
    if not args.prefill:
        return
    prompt = _random_ids(model, args.prefill, seed=1).reshape(-1).tolist()
    chains = OnnxEngine(model, max_context=8192, threads=args.threads, prefill_chunk=64)
    chains.prefill(prompt[:130])  # the chain graphs' exports and loads
    for name, run in (
        ("onnx chains of 64", lambda: chains.prefill(prompt)),
        ("torch reference", lambda: model.prefill(torch.tensor([prompt]))),
    ):
        start = time.perf_counter()
        run()
        row = {"prefill": name, "tokens": len(prompt), "threads": args.threads}
        row["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
