"""llama.cpp as the C++ CPU reference peer for ``bench decode`` and ``bench prefill`` (optional:
``llama-cpp-python``).

It is a source build, so it is never a dependency: the peer runs when ``llama_cpp`` imports. The
protocols are ours (:mod:`linearize.bench.speed`). Decode: prefill ``C − warmup − steps`` random
tokens, then time greedy one-token steps (``eval`` + argmax over the logits) ending at context
``C``, taking turns with our runs at the same context, each in a fresh process (or all in ours:
``--no-isolate``). Prefill: after an untimed prompt of :data:`PREFILL_WARM` tokens, time one
``eval`` of ``C`` random tokens (in batches of :data:`N_BATCH`, on the same threads as ours) and
the argmax of the last one's logits, in a fresh process after our models' runs at ``C``.
``state_bytes`` is llama.cpp's KV cache for the ``C`` tokens (f16 keys and values, its
default), computed from the GGUF metadata.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from linearize.bench.memory import RssSampler
from linearize.bench.speed import DecodeRow, decode_row

logger = logging.getLogger(__name__)

KV_BYTES = 2  # f16 cache entries
N_BATCH = 512  # tokens per llama_decode call (llama-cpp-python's default)
PREFILL_WARM = 64  # untimed prompt tokens before a timed prefill (ours: one chunk)


def available() -> bool:
    """True when ``llama_cpp`` (llama-cpp-python) is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_info(path: str | Path) -> dict[str, int]:
    """Layers, KV heads, head dim and trained context of a LLaMA-family GGUF file, and the
    bytes of weights a decode step reads (every tensor's; the embedding table only where it is
    also the output layer, as in tied models: otherwise a step copies one row of it)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str) -> int:
        for name, f in reader.fields.items():
            if name.endswith(key):
                return int(f.parts[f.data[0]][0])
        raise ValueError(f"{path}: GGUF metadata lacks *{key}")

    heads = field(".attention.head_count")
    names = {t.name for t in reader.tensors}
    looked_up = {"token_embd.weight"} if "output.weight" in names else set()
    read = sum(int(t.n_bytes) for t in reader.tensors if t.name not in looked_up)
    return {
        "layers": field(".block_count"),
        "kv_heads": field(".attention.head_count_kv"),
        "head_dim": field(".embedding_length") // heads,
        "context": field(".context_length"),
        "weight_bytes": read,
    }


def _llama(path: str, context: int, threads: int, batch_threads: int):
    """llama.cpp's model and context for ``context`` tokens: one token at a time on ``threads``,
    prompts in batches of :data:`N_BATCH` on ``batch_threads``. Close it when done: left to the
    garbage collector at interpreter exit, llama-cpp-python's finalizer runs after its C library
    is unloaded and prints a ``TypeError`` traceback (llama-cpp-python 0.3.36)."""
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=batch_threads,
        n_batch=N_BATCH,
        verbose=False,
    )


def _logits(llm) -> Callable[[], Any]:
    """A call that reads the last evaluated token's logits ``[vocab]`` from ``llm`` (a view of
    llama.cpp's buffer, made once: the timed steps only call it)."""
    import numpy as np
    from llama_cpp import llama_get_logits_ith

    vocab = llm.n_vocab()
    return lambda: np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))


class LlamaDecoding:
    """A llama.cpp decode run on the GGUF ``path`` (:class:`linearize.bench.speed.Decoding`):
    ``context − span`` random tokens evaluated (on every core: not timed), then one ``eval`` +
    argmax per step (on ``threads``)."""

    def __init__(self, path: str, context: int, span: int, threads: int) -> None:
        import numpy as np

        self.llm = _llama(path, context, threads, max(threads, os.cpu_count() or 1))
        self._logits = _logits(self.llm)
        prompt = np.random.default_rng(0).integers(0, self.llm.n_vocab(), context - span)
        self.llm.eval(prompt.tolist())
        self.token = int(self._logits().argmax())
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        self.llm.eval([self.token])
        self.token = int(self._logits().argmax())
        if timed:
            self.times.append(time.perf_counter() - start)

    def result(self) -> dict[str, Any]:
        """The step times; the run is over, so llama.cpp's model is closed (:func:`_llama`)."""
        self.llm.close()
        return {"times": self.times}


def time_prefill(path: str, context: int, threads: int, kv_per_token: int) -> dict[str, Any]:
    """Seconds for llama.cpp to read a prompt of ``context`` random tokens on ``threads``
    threads (then the argmax of the last token's logits), the KV cache bytes and the RSS the pass
    added (:func:`linearize.bench.speed.time_prefill`'s keys)."""
    import numpy as np

    with contextlib.closing(_llama(path, context, threads, threads)) as llm:
        logits = _logits(llm)
        ids = np.random.default_rng(0).integers(0, llm.n_vocab(), context).tolist()
        llm.eval(ids[:PREFILL_WARM])
        llm.reset()
        with RssSampler() as sampler:
            start = time.perf_counter()
            llm.eval(ids)
            logits().argmax()
            seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "state_bytes": kv_per_token * context,
        "activation_bytes": sampler.added,
        "quant": "gguf",
        "engine": "llama.cpp",
    }


class LlamaCppPeer:
    """llama.cpp on the GGUF ``path`` as a peer of ``bench decode``
    (:class:`linearize.bench.speed.Peer`) and ``bench prefill``
    (:class:`~linearize.bench.speed.PrefillPeer`): rows labelled ``label``, quant ``gguf``,
    engine ``llama.cpp``."""

    def __init__(self, path: str | Path, label: str, threads: int) -> None:
        if not available():
            raise RuntimeError(
                "llama.cpp peer: llama-cpp-python is not installed "
                "(pip install 'linearize[llama-cpp]')"
            )
        self.path, self.label, self.threads = str(path), label, threads
        info = gguf_info(path)
        self.max_context = info["context"]
        self.weight_bytes = info["weight_bytes"]
        self.kv_per_token = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * KV_BYTES

    def supports(self, context: int) -> bool:
        return context <= self.max_context

    def run(self, context: int, span: int) -> tuple[type[LlamaDecoding], tuple[Any, ...]]:
        return LlamaDecoding, (self.path, context, span, self.threads)

    def prefill(self, context: int) -> tuple[Any, tuple[Any, ...]]:
        """The prefill of ``context`` tokens (any length: past the trained context the compute
        is the same, as for our softmax models)."""
        return time_prefill, (self.path, context, self.threads, self.kv_per_token)

    def row(self, context: int, result: dict[str, Any] | None, peak: int | None) -> DecodeRow:
        if result is None:
            return DecodeRow(self.label, context, None, None, None, None, "gguf", "llama.cpp")
        state = self.kv_per_token * context
        result = {**result, "state_bytes": state, "quant": "gguf", "engine": "llama.cpp"}
        result["kv_type"] = "float16"  # (llama.cpp's KV cache by default: KV_BYTES a value)
        result["read_bytes"] = self.weight_bytes + state
        return decode_row(self.label, context, result, peak)
