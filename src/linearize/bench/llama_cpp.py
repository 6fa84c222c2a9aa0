"""llama.cpp as the C++ CPU reference peer for ``bench decode`` (optional: ``llama-cpp-python``).

It is a source build, so it is never a dependency: the peer runs when ``llama_cpp`` imports. The
protocol is ours (:mod:`linearize.bench.speed`): prefill ``C − warmup − steps`` random tokens,
then time greedy one-token steps (``eval`` + argmax over the logits) ending at context ``C``,
each context in a fresh process. ``state_bytes`` is llama.cpp's KV cache for the ``C`` tokens
(f16 keys and values, its default), computed from the GGUF metadata.
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from linearize.bench.memory import run_isolated
from linearize.bench.speed import DEFAULT_DECODE_WARMUP, DecodeRow, Progress

logger = logging.getLogger(__name__)

KV_BYTES = 2  # f16 cache entries


def available() -> bool:
    """True when ``llama_cpp`` (llama-cpp-python) is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_info(path: str | Path) -> dict[str, int]:
    """Layers, KV heads, head dim and trained context of a LLaMA-family GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str) -> int:
        for name, f in reader.fields.items():
            if name.endswith(key):
                return int(f.parts[f.data[0]][0])
        raise ValueError(f"{path}: GGUF metadata lacks *{key}")

    heads = field(".attention.head_count")
    return {
        "layers": field(".block_count"),
        "kv_heads": field(".attention.head_count_kv"),
        "head_dim": field(".embedding_length") // heads,
        "context": field(".context_length"),
    }


def _worker(path: str, context: int, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    llm = Llama(
        model_path=path,
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def argmax() -> int:
        logits = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    prompt = np.random.default_rng(0).integers(0, vocab, context - steps - warmup)
    llm.eval(prompt.tolist())
    token, times = argmax(), []
    for i in range(warmup + steps):
        start = time.perf_counter()
        llm.eval([token])
        token = argmax()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"times": times}


def bench_decode(
    path: str | Path,
    label: str,
    contexts: tuple[int, ...],
    *,
    steps: int = 32,
    warmup: int = DEFAULT_DECODE_WARMUP,
    threads: int = 2,
    progress: Progress | None = None,
) -> list[DecodeRow]:
    """One :class:`DecodeRow` per context for llama.cpp on the GGUF file ``path``."""
    if not available():
        raise RuntimeError("llama.cpp peer: llama-cpp-python is not installed")
    info = gguf_info(path)
    kv_per_token = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * KV_BYTES
    rows = []
    for context in contexts:
        if progress is not None:
            progress(f"decode {label} @ {context}")
        if context > info["context"]:
            rows.append(DecodeRow(label, context, None, None, None, None))
            continue
        result, peak = run_isolated(_worker, str(path), context, steps, warmup, threads)
        ms = 1000 * statistics.median(result["times"])
        rows.append(DecodeRow(label, context, 1000 / ms, ms, kv_per_token * context, peak))
    return rows
