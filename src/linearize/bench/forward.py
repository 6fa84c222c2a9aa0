"""Teacher vs linearized model: prefill tokens/s, per-token decode latency, peak RSS.

Each (model, measurement, context) runs in a fresh process by default, so its peak RSS is its
own. Decode at context C: prefill C tokens (chunk form / SDPA), then time single-token steps
(median). The transformers baseline is ``generate()`` on the same weights at 1k context (the
built-in SmolLM2-135M only).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from linearize.bench.memory import peak_rss_bytes, run_isolated
from linearize.bench.speed import ModelSpec, parse_contexts
from linearize.config import Config, option

logger = logging.getLogger(__name__)

MODELS = ("softmax", "augmented", "transformers")
# The softmax original's positions end here; the transformers baseline runs at this context.
SOFTMAX_CONTEXT, TRANSFORMERS_CONTEXT = 8192, 1024


@dataclass
class ForwardBenchConfig(Config):
    """What ``linearize bench forward`` measures."""

    contexts: str = option("comma-separated decode contexts", "1024,8192,32768")
    prefill: str = option("comma-separated prefill lengths", "1024,8192")
    steps: int = option("timed decode steps (median)", 16)
    model: str = option(
        "the softmax model (name or path); 'augmented' linearizes it", "smollm2-135m"
    )
    transformers: bool = option("also time transformers' generate() (smollm2-135m only)", True)
    isolate: bool = option("each measurement in a fresh process (its own peak RSS)", True)

    def validate(self) -> ForwardBenchConfig:
        self.lengths("contexts")
        self.lengths("prefill")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        return self

    def lengths(self, name: str) -> list[int]:
        """The comma-separated token counts of field ``name`` (``8k`` allowed)."""
        values = list(parse_contexts(getattr(self, name)))
        if min(values) < 1:
            raise ValueError(f"{name} {getattr(self, name)!r}: every count must be >= 1")
        return values


def measure(source: str, kind: str, what: str, context: int, steps: int) -> dict:
    """One row: ``kind`` (softmax, augmented, transformers) of ``source`` at ``context``."""
    torch.manual_seed(0)
    if kind == "transformers":
        return _measure_transformers(torch.randint(0, 49152, (1, context)), steps)
    model = ModelSpec(source, "augmented" if kind == "augmented" else None).load()
    ids = torch.randint(0, model.config.vocab_size, (1, context))
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
    row["peak_rss_bytes"] = peak_rss_bytes()
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
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _run(config: ForwardBenchConfig, kind: str, what: str, context: int, steps: int) -> dict:
    job = (config.model, kind, what, context, steps)
    if not config.isolate:
        return measure(*job)
    try:
        row, _ = run_isolated(measure, *job)
    except RuntimeError as e:
        return {"model": kind, "context": context, "error": str(e).strip().splitlines()[-1]}
    return row


def bench_forward(
    config: ForwardBenchConfig, progress: Callable[[str], None] = lambda message: None
) -> list[dict]:
    """Prefill rows (softmax, augmented), then decode rows (and the transformers baseline)."""
    rows = []
    for context in config.lengths("prefill"):
        for kind in ("softmax", "augmented"):
            progress(f"prefill {kind} @ {context}")
            rows.append({"what": "prefill", **_run(config, kind, "prefill", context, 0)})
    kinds = MODELS if config.transformers else MODELS[:2]
    for context in config.lengths("contexts"):
        for kind in kinds:
            if kind != "augmented" and context > SOFTMAX_CONTEXT:
                continue  # the original's context ends at 8192 positions
            if kind == "transformers" and context != TRANSFORMERS_CONTEXT:
                continue
            progress(f"decode {kind} @ {context}")
            rows.append({"what": "decode", **_run(config, kind, "decode", context, config.steps)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| what | model | context | prefill tok/s | decode ms/token | tok/s | state MiB "
        "| RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def fmt(key, scale=1.0, digits=1, r=r):
            return f"{r[key] / scale:.{digits}f}" if key in r else "-"

        lines.append(
            f"| {r['what']} | {r['model']} | {r['context']} | {fmt('prefill_tokens_per_s')} | "
            f"{fmt('ms_per_token')} | {fmt('tokens_per_s')} | {fmt('state_bytes', 2**20, 2)} | "
            f"{fmt('peak_rss_bytes', 2**20, 0)} |" + (f" {r['error']}" if "error" in r else "")
        )
    return "\n".join(lines)
