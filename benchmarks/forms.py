"""Time and peak memory of the parallel, chunk and recurrent forms, against softmax (SDPA).

    python benchmarks/forms.py --lengths 1024,4096,16384 [--json] [--plot results/forms.png]

One attention layer at the default model's shape (hidden 576, 9 heads, 3 kv heads, head dim 64),
batch 1, float32, ``torch.no_grad``, CPU. Each measurement runs in a fresh subprocess, so that
one measurement's freed memory cannot hide the next one's allocations.

- time: CPU seconds of the process (``time.process_time``) with one intra-op thread by default,
  which other processes sharing the cores do not inflate the way they inflate wall time; with
  ``--threads N`` it is the sum over threads, so read it as work, not latency.
- parallel / chunk: time of one layer call on ``T`` tokens (minimum over up to 3 calls).
- recurrent: the state is advanced to ``T`` tokens (chunk form for linear layers, SDPA prefill for
  softmax), then ``--steps`` single-token steps are timed; the row reports time per step, which is
  flat in ``T`` for a fixed-size state and grows with ``T`` for a KV cache.
- peak memory: the increase of the process's peak resident set size (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs`` just before the first full-size call) over its resident size
  just before it. It counts everything the call allocates and touches (activations, scratch,
  output), not the weights or the input; memory the allocator kept from the small warm-up call
  is reused without being counted, so it can read slightly low. For recurrent rows it covers the
  timed steps only; ``state_bytes`` is the decoding state itself.

A form whose ``T×T`` score matrices would exceed ``--max-tt-bytes`` is skipped and reported with
the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, HEADS, KV_HEADS = 576, 9, 3
LAYERS = {"augmented": ("parallel", "chunk", "recurrent"), "softmax": ("parallel", "recurrent")}
# Scores, weights and the global part's scores are each [H, T, T] in the augmented parallel form.
TT_MATRICES = {("augmented", "parallel"): 3}


def tt_bytes(layer: str, form: str, T: int) -> int:
    """Bytes of the T×T matrices a form materialises (0: none; SDPA's CPU kernel is blocked)."""
    return TT_MATRICES.get((layer, form), 0) * HEADS * T * T * 4


# --- one measurement, in its own process ----------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(layer: str, form: str, T: int, steps: int, threads: int) -> dict:
    from linearize.check import random_layer

    torch.set_num_threads(threads)
    row = {"layer": layer, "form": form, "T": T, "threads": threads}
    layer = random_layer(
        layer,
        hidden_size=HIDDEN,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        dtype=torch.float32,
    ).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, HIDDEN, generator=generator)
    with torch.no_grad():
        if form == "recurrent":
            prefill = "chunk" if layer.config.kind == "linear" else "parallel"
            start = time.process_time()
            _, state = layer(x, form=prefill)
            row["prefill_s"] = time.process_time() - start
            tokens = torch.randn(steps + 2, 1, 1, HIDDEN, generator=generator)
            for token in tokens[:2]:  # warm-up; also lets a KV cache grow once
                _, state = layer(token, state=state, form="recurrent")
            base = _status("VmRSS")
            _reset_peak()
            times = []
            for token in tokens[2:]:
                start = time.process_time()
                _, state = layer(token, state=state, form="recurrent")
                times.append(time.process_time() - start)
            row["peak_bytes"] = max(0, _status("VmHWM") - base)
            row["seconds"] = statistics.median(times)
            row["state_bytes"] = state.nbytes()
        else:
            layer(x[:, : min(T, 256)], form=form)  # warm-up
            base = _status("VmRSS")
            _reset_peak()
            start = time.process_time()
            layer(x, form=form)
            times = [time.process_time() - start]
            row["peak_bytes"] = max(0, _status("VmHWM") - base)
            # Up to 3 calls in all, within about 30 s: the minimum is the least disturbed.
            for _ in range(min(2, int(30 // max(times[0], 1e-3)) - 1)):
                start = time.process_time()
                layer(x, form=form)
                times.append(time.process_time() - start)
            row["seconds"] = min(times)
    return row


# --- the driver -----------------------------------------------------------------------------


def run_all(args: argparse.Namespace, lengths: list[int]) -> list[dict]:
    rows = []
    for T in lengths:
        for layer_name, forms in LAYERS.items():
            for form in forms:
                rows.append(_run_one(layer_name, form, T, args))
                print(_markdown_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _run_one(layer: str, form: str, T: int, args: argparse.Namespace) -> dict:
    estimate = tt_bytes(layer, form, T)
    if estimate > args.max_tt_bytes:
        return {"layer": layer, "form": form, "T": T, "skipped": "T×T", "tt_bytes": estimate}
    job = {"layer": layer, "form": form, "T": T, "steps": args.steps, "threads": args.threads}
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"layer": layer, "form": form, "T": T, "skipped": f"timeout {args.timeout:.0f}s"}
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "crashed"
        return {"layer": layer, "form": form, "T": T, "skipped": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


HEADER = (
    "| layer | form | T | time | peak memory | state | note |\n|---|---|---:|---:|---:|---:|---|"
)


def _markdown_row(row: dict) -> str:
    if "skipped" in row:
        note = f"skipped ({row['skipped']})"
        if "tt_bytes" in row:
            note += f": T×T matrices ≈ {_fmt_bytes(row['tt_bytes'])}"
        return f"| {row['layer']} | {row['form']} | {row['T']} | – | – | – | {note} |"
    if row["form"] == "recurrent":
        time_text = f"{row['seconds'] * 1e3:.2f} ms/step"
        state = _fmt_bytes(row["state_bytes"])
        note = f"prefill {row['prefill_s']:.2f} s"
    else:
        time_text, state, note = f"{row['seconds']:.3f} s", "", ""
    memory = _fmt_bytes(max(row["peak_bytes"], 0))
    cells = [row["layer"], row["form"], row["T"], time_text, memory, state, note]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for layer_name, forms in LAYERS.items():
        for form in forms:
            points = [
                (r["T"], r["seconds"])
                for r in rows
                if r["layer"] == layer_name and r["form"] == form and "skipped" not in r
            ]
            if not points:
                continue
            Ts, secs = zip(*points, strict=True)
            axis = right if form == "recurrent" else left
            scale = 1e3 if form == "recurrent" else 1.0
            axis.plot(Ts, [s * scale for s in secs], marker="o", label=f"{layer_name} {form}")
    left.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="seconds per call")
    left.set_title("Prefill: one call on T tokens")
    right.set(xscale="log", yscale="log", xlabel="context T (tokens)", ylabel="ms per token")
    right.set_title("Decoding: one recurrent step at context T")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.suptitle(f"hidden {HIDDEN}, {HEADS} heads, {KV_HEADS} kv heads, batch 1, float32, CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384,32768", help="comma-separated T")
    parser.add_argument("--steps", type=int, default=32, help="recurrent steps timed per row")
    parser.add_argument("--json", action="store_true", help="also print one JSON object per row")
    parser.add_argument("--plot", type=Path, default=Path("results/forms.png"), help="PNG path")
    parser.add_argument(
        "--max-tt-bytes", type=float, default=8e9, help="skip forms whose T×T matrices exceed this"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: stable timings on a shared machine)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(_measure(**job)))
        return
    lengths = [int(t) for t in args.lengths.split(",")]
    load = os.getloadavg()[0]
    rows = run_all(args, lengths)
    print(f"{args.threads} thread(s), load average {load:.1f} at start\n")
    print(HEADER)
    for row in rows:
        print(_markdown_row(row))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
