"""Teacher vs linearized SmolLM2: prefill tokens/s, per-token decode latency, peak RSS.

Each (model, measurement, context) runs in a fresh subprocess so its peak RSS is its own.
Decode at context C: prefill C tokens (chunk form / SDPA), then time single-token steps
(median). The transformers baseline is ``generate()`` on the same weights at 1k context.

    .venv/bin/python benchmarks/model_forward.py [--contexts 1024,8192,32768] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

MODELS = ("softmax", "augmented", "transformers")


def _load(kind: str):
    import linearize

    model = linearize.load("smollm2-135m").eval()
    if kind == "augmented":
        linearize.linearize(model, "augmented")
    return model


def measure(kind: str, what: str, context: int, steps: int) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (1, context))
    if kind == "transformers":
        return _measure_transformers(ids, steps)
    model = _load(kind)
    with torch.no_grad():
        start = time.perf_counter()
        _, state = model(ids, form="auto" if kind == "softmax" else "chunk")
        prefill = time.perf_counter() - start
        row = {"model": kind, "context": context, "prefill_tokens_per_s": context / prefill}
        if what == "decode":
            token, times = ids[:, -1:], []
            for _ in range(steps):
                start = time.perf_counter()
                logits, state = model(token, state=state)
                times.append(time.perf_counter() - start)
                token = logits[:, -1:].argmax(-1)
            ms = statistics.median(times) * 1000
            row.update(ms_per_token=ms, tokens_per_s=1000 / ms, state_bytes=state.nbytes())
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def _measure_transformers(ids: torch.Tensor, steps: int) -> dict:
    import transformers

    from linearize.models.checkpoint import load_smollm2
    from linearize.paths import cache_dir

    load_smollm2()
    path = cache_dir() / "models" / "smollm2-135m"
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps + 1, do_sample=False, min_new_tokens=steps)
        total = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    ms = (total - prefill) / max(new - 1, 1) * 1000
    return {
        "model": "transformers",
        "context": ids.shape[1],
        "ms_per_token": ms,
        "tokens_per_s": 1000 / ms,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_subprocess(kind: str, what: str, context: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--inner", kind, what, str(context), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"model": kind, "context": context, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,8192,32768")
    parser.add_argument("--prefill", default="1024,8192")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inner", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        kind, what, context, steps = args.inner
        print(json.dumps(measure(kind, what, int(context), int(steps))))
        return
    rows = []
    for context in map(int, args.prefill.split(",")):
        for kind in ("softmax", "augmented"):
            rows.append({"what": "prefill", **run_subprocess(kind, "prefill", context, 0)})
    for context in map(int, args.contexts.split(",")):
        for kind in MODELS:
            if kind != "augmented" and context > 8192:
                continue  # the original's context ends at 8192 positions
            if kind == "transformers" and context != 1024:
                continue
            rows.append({"what": "decode", **run_subprocess(kind, "decode", context, args.steps)})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        "| what | model | context | prefill tok/s | decode ms/token | tok/s | state MiB | RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:

        def fmt(key, scale=1.0, digits=1, r=r):
            return f"{r[key] / scale:.{digits}f}" if key in r else "-"

        print(
            f"| {r['what']} | {r['model']} | {r['context']} | {fmt('prefill_tokens_per_s')} | "
            f"{fmt('ms_per_token')} | {fmt('tokens_per_s')} | {fmt('state_bytes', 2**20, 2)} | "
            f"{fmt('peak_rss_bytes', 2**20, 0)} |" + (f" {r['error']}" if "error" in r else "")
        )


if __name__ == "__main__":
    main()
