"""Time and peak memory of the parallel, chunk and recurrent forms, against softmax (SDPA).

One attention layer at the default model's shape (hidden 576, 9 heads, 3 kv heads), batch 1,
float32, ``torch.no_grad``, CPU. Each measurement runs in a fresh process by default, so that
one measurement's freed memory cannot hide the next one's allocations.

- time: CPU seconds of the process (``time.process_time``) with one intra-op thread by default,
  which other processes sharing the cores do not inflate the way they inflate wall time; with
  ``--threads N`` it is the sum over threads, so read it as work, not latency.
- parallel / chunk: time of one layer call on ``T`` tokens (minimum over up to 3 calls).
- recurrent: the state is advanced to ``T`` tokens (chunk form for linear layers, SDPA prefill for
  softmax), then ``--steps`` single-token steps are timed; the row reports time per step, which is
  flat in ``T`` for a fixed-size state and grows with ``T`` for a KV cache.
- peak memory: the increase of the process's peak resident set size (Linux ``VmHWM``, reset just
  before the first full-size call) over its resident size just before it. It counts everything
  the call allocates and touches (activations, scratch, output), not the weights or the input;
  memory the allocator kept from the small warm-up call is reused without being counted, so it
  can read slightly low. For recurrent rows it covers the timed steps only; ``state_bytes`` is
  the decoding state itself.

A form whose ``T×T`` score matrices would exceed ``max_tt_bytes`` is skipped and reported with
the estimate.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from linearize.bench.memory import (
    current_rss_bytes,
    high_water_rss_bytes,
    reset_peak_rss,
    run_isolated,
)
from linearize.bench.speed import parse_contexts
from linearize.config import Config, option
from linearize.layers.random import random_layer

logger = logging.getLogger(__name__)

HIDDEN, HEADS, KV_HEADS = 576, 9, 3
LAYERS = {"augmented": ("parallel", "chunk", "recurrent"), "softmax": ("parallel", "recurrent")}
# Scores, weights and the global part's scores are each [H, T, T] in the augmented parallel form.
TT_MATRICES = {("augmented", "parallel"): 3}


@dataclass
class FormsBenchConfig(Config):
    """What ``linearize bench forms`` measures."""

    lengths: str = option("comma-separated T (8k allowed)", "1024,4096,16384,32768")
    steps: int = option("recurrent steps timed per row", 32)
    plot: str = option("PNG path", "results/forms.png")
    max_tt_bytes: float = option("skip forms whose T×T matrices exceed this", 8e9)
    timeout: float = option("seconds per measurement", 600)
    threads: int = option("torch intra-op threads (1: stable timings on a shared machine)", 1)
    isolate: bool = option("each measurement in a fresh process (its own peak memory)", True)

    def validate(self) -> FormsBenchConfig:
        self.token_counts()
        for name in ("steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        return self

    def token_counts(self) -> list[int]:
        """The lengths ``T`` as integers (``8k`` allowed)."""
        lengths = list(parse_contexts(self.lengths))
        if min(lengths) < 1:
            raise ValueError(f"lengths {self.lengths!r}: every T must be >= 1")
        return lengths


def tt_bytes(layer: str, form: str, T: int) -> int:
    """Bytes of the T×T matrices a form materialises (0: none; SDPA's CPU kernel is blocked)."""
    return TT_MATRICES.get((layer, form), 0) * HEADS * T * T * 4


def measure(layer: str, form: str, T: int, steps: int, threads: int) -> dict:
    """One row: time and peak memory of ``layer`` in ``form`` on ``T`` tokens."""
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
            base = current_rss_bytes()
            reset_peak_rss()
            times = []
            for token in tokens[2:]:
                start = time.process_time()
                _, state = layer(token, state=state, form="recurrent")
                times.append(time.process_time() - start)
            row["peak_bytes"] = max(0, high_water_rss_bytes() - base)
            row["seconds"] = statistics.median(times)
            row["state_bytes"] = state.nbytes()
        else:
            layer(x[:, : min(T, 256)], form=form)  # warm-up
            base = current_rss_bytes()
            reset_peak_rss()
            start = time.process_time()
            layer(x, form=form)
            times = [time.process_time() - start]
            row["peak_bytes"] = max(0, high_water_rss_bytes() - base)
            # Up to 3 calls in all, within about 30 s: the minimum is the least disturbed.
            for _ in range(min(2, int(30 // max(times[0], 1e-3)) - 1)):
                start = time.process_time()
                layer(x, form=form)
                times.append(time.process_time() - start)
            row["seconds"] = min(times)
    return row


def bench_forms(
    config: FormsBenchConfig, on_row: Callable[[dict], None] = lambda row: None
) -> list[dict]:
    """Every (T, layer, form) row, in order; ``on_row`` sees each one as it is measured."""
    rows = []
    for T in config.token_counts():
        for layer, forms in LAYERS.items():
            for form in forms:
                rows.append(_run_one(layer, form, T, config))
                on_row(rows[-1])
    return rows


def _run_one(layer: str, form: str, T: int, config: FormsBenchConfig) -> dict:
    estimate = tt_bytes(layer, form, T)
    if estimate > config.max_tt_bytes:
        return {"layer": layer, "form": form, "T": T, "skipped": "T×T", "tt_bytes": estimate}
    job = (layer, form, T, config.steps, config.threads)
    if not config.isolate:
        return measure(*job)
    try:
        row, _ = run_isolated(measure, *job, timeout=config.timeout)
    except TimeoutError:
        return {"layer": layer, "form": form, "T": T, "skipped": f"timeout {config.timeout:.0f}s"}
    except RuntimeError as e:
        return {"layer": layer, "form": form, "T": T, "skipped": str(e) or "crashed"}
    return row


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


HEADER = (
    "| layer | form | T | time | peak memory | state | note |\n|---|---|---:|---:|---:|---:|---|"
)


def markdown_row(row: dict) -> str:
    """One row of the table under ``HEADER``."""
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


def plot(rows: list[dict], path: str | Path) -> None:
    """Prefill time per call and decode time per step against ``T``, one line per form."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
