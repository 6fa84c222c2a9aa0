"""The onnx engine's decode step with whole rings (``reach_step=0``) against rings read to their
filled part (``--reach-step``, the default 256), same model, same run, one thread; one JSON row
per measurement, then a table.

    .venv/bin/python scripts/bench_reach.py --model runs/wide6-q4 --contexts 1024,8192

Each context's state comes from one prefill by the PyTorch reference and is loaded into both
engines; each engine then runs ``--warmup`` untimed and ``--steps`` timed steps (the
token fed is the prompt's next one), alternating engines ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import linearize
from linearize.bench.speed import _random_ids
from linearize.engine.onnx import OnnxEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved (int4 / int8) model directory")
    parser.add_argument("--contexts", default="1024,8192", help="comma-separated contexts")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reach-step", type=int, default=256, help="the engine's reach_step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = linearize.load(args.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    n = args.warmup + args.steps
    ids = _random_ids(model, max(contexts) + n)
    engines = {
        step: OnnxEngine(model, max_context=max(contexts) + n, threads=1, reach_step=step)
        for step in (0, args.reach_step)
    }
    rows = []
    for context in contexts:
        with torch.no_grad():
            _, state = model.prefill(ids[:, :context])  # in segments: 128k contexts fit
        for repeat in range(args.repeats):
            for step, engine in engines.items():
                engine.load_state(state)
                tokens = ids[0, context : context + n].tolist()
                for token in tokens[: args.warmup]:
                    engine.step(token)
                start = time.perf_counter()
                for token in tokens[args.warmup :]:
                    engine.step(token)
                seconds = time.perf_counter() - start
                row = {
                    "context": context,
                    "reach_step": step,
                    "repeat": repeat,
                    "slots_read": engine.state.reach,
                    "tokens_per_s": round(args.steps / seconds, 1),
                    "state_mb": round(engine.nbytes() / 1e6, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| context | reach_step | tokens/s (each repeat) |\n|---|---|---|")
    for context in contexts:
        for step in engines:
            rates = [
                r["tokens_per_s"]
                for r in rows
                if (r["context"], r["reach_step"]) == (context, step)
            ]
            print(f"| {context:,} | {step} | {' / '.join(map(str, rates))} |")


if __name__ == "__main__":
    main()
