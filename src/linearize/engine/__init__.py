"""Fast decoding engines: the model's fixed-shape one-token step, exported and run fast.

``torch`` is the reference: the PyTorch decoder itself (every attention, any architecture).
``onnx`` exports the model's one-token step and tree step to ONNX Runtime with the state as
fixed-shape ring buffers (a step reads a long ring up to its filled part), quantized linears as
4-/8-bit ``MatMulNBits`` (:mod:`linearize.engine.onnx`), each softmax window read by linearize's
own ``RingAttention`` kernel where it builds (:mod:`linearize.engine.kernels`); it runs plain and
speculative decoding.
``auto`` picks ``onnx`` for an int8 / int4 model when onnxruntime is installed and the engine
runs every layer (:func:`supports`: softmax and every linear attention, the default
``augmented`` included), else ``torch`` (bf16 weights run on ``torch``: oneDNN's bf16 matmul).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Literal, get_args

import torch

from linearize.models.decoder import Decoder

logger = logging.getLogger(__name__)

Engine = Literal["auto", "torch", "onnx"]
ENGINES = get_args(Engine)


def check_engine(name: str) -> str:
    """``name`` if it is an ``--engine`` value, else a ``ValueError`` naming the allowed ones."""
    if name not in ENGINES:
        raise ValueError(f"engine={name!r}; allowed: {list(ENGINES)}")
    return name


def resolve_engine(name: str, model: Decoder) -> str:
    """The engine ``name`` stands for (``auto`` resolved); errors for what cannot run."""
    check_engine(name)
    if name == "auto":
        installed = importlib.util.find_spec("onnxruntime") is not None
        fast = model.quantization is not None and installed and supports(model)
        name = "onnx" if fast else "torch"
        logger.info("engine: %s", name)
    return name


def supports(model: Decoder) -> bool:
    """Whether the onnx engine runs every layer of ``model`` (see ``engine.step.unsupported``)."""
    from linearize.engine.step import unsupported

    if model.config.architecture != "llama":
        return False
    if model.quantization is not None and not model.quantization.coded:
        return False
    return all(unsupported(layer.self_attn) is None for layer in model.layers)


def build_engine(
    name: str,
    model: Decoder,
    *,
    max_context: int,
    threads: int | None = None,
    accuracy: str = "int8",
    kv_type: str | None = None,
):
    """An engine object (``prefill(ids) -> logits``, ``step(token) -> logits``,
    ``forward_tree``, ``commit``) or ``None`` for ``torch`` (the decoder itself); its prompts
    of :data:`~linearize.engine.onnx.PREFILL_CHUNK` tokens or more prefill on it. ``accuracy``:
    the onnx engine's matmul arithmetic, ``int8`` (fast) or ``fp32`` (the reference's numbers;
    see :data:`linearize.engine.onnx.ACCURACY`); ``kv_type``: the keys and values of its
    softmax rings, float32, float16 or int8 (default: float16 for quantized weights in ``int8``;
    :class:`~linearize.engine.onnx.OnnxEngine`)."""
    if name == "torch":
        return None
    from linearize.engine.onnx import PREFILL_CHUNK, OnnxEngine

    return OnnxEngine(
        model,
        max_context=context_bucket(max_context),
        threads=threads,
        accuracy=accuracy,
        prefill_chunk=PREFILL_CHUNK,
        kv_type=kv_type,
    )


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread inside: for its small work between an engine's runs (sampling a
    token from the logits). onnxruntime's threads keep the cores between runs (they spin), and
    PyTorch's pool, woken for a reduction over the vocabulary, spins on the same cores after it:
    on two cores the default int4 model, stepped and sampled, decoded at 44–51 tokens/s with
    both pools against 71–76 with PyTorch on one thread (docs/results.md, "Two threads").
    PyTorch's thread count is the process's: use it on the thread that runs the model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def context_bucket(tokens: int) -> int:
    """Softmax caches are sized in powers of two (>= 1024), so few graphs are exported."""
    size = 1024
    while size < tokens:
        size *= 2
    return size


__all__ = [
    "ENGINES",
    "Engine",
    "build_engine",
    "check_engine",
    "context_bucket",
    "one_torch_thread",
    "resolve_engine",
]
