"""Decode and prefill benchmarks as library functions returning rows.

**Decode** at context ``C``: prefill ``C − warmup − steps`` random tokens in one pass (chunk form
for linear layers, SDPA for softmax ones), then decode ``warmup + steps`` tokens greedily in the
recurrent form, timing each step (forward + argmax); the row reports the median step, so the
timed steps end exactly at context ``C``. **Prefill** of ``C`` tokens: one pass (chunk form) plus
the LM head on the last token, after a short warm-up pass.

Each (model, context) runs in a fresh process by default (``isolate=True``), so
``peak_rss_bytes`` is that process's own high-water mark (``getrusage``): interpreter, torch,
the model weights and the run. A context the memory cannot hold is refused before anything is
allocated, with the estimate. A softmax model's decode stops at its ``max_position_embeddings``:
past it the row is reported as not supported (``None`` values) rather than measured. The models
take turns at each context (a shared machine's drifting load then biases none of them), and every
(model, context) is checked against the memory before the first measurement. In one process
(``isolate=False``) decode goes further: every (model, context), and every peer's run
(llama.cpp), is prefilled first, then they take turns step by step (:func:`take_turns`),
holding all their states at once.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol

import torch

from linearize.bench.memory import (
    available_memory_bytes,
    current_rss_bytes,
    format_bytes,
    peak_rss_bytes,
    run_isolated,
)
from linearize.models.decoder import Decoder

logger = logging.getLogger(__name__)

DEFAULT_DECODE_CONTEXTS = (1024, 4096, 8192, 16384, 32768)
# Untimed decode steps before the timed ones (`bench decode --warmup`).
DEFAULT_DECODE_WARMUP = 2
DEFAULT_PREFILL_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
# Fraction of the available memory a run may plan to use.
MEMORY_HEADROOM = 0.85

Progress = Callable[[str], None]
OnModel = Callable[["ModelSpec", Decoder], None]


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a built-in name or path, optionally linearized (untrained, which is
    enough for speed) with a registry attention."""

    source: str
    attention: str | None = None
    quant: str | None = None
    engine: str = "torch"

    @property
    def label(self) -> str:
        label = self.source if self.attention is None else f"{self.source}+{self.attention}"
        if self.quant not in (None, "none"):
            label += f"+{self.quant}"
        return label if self.engine in ("torch", "auto") else f"{label}@{self.engine}"

    def load(self) -> Decoder:
        from linearize.models import linearize, load
        from linearize.models.quantize import apply_quant

        model = load(self.source)
        if self.attention is not None:
            linearize(model, self.attention)
        return apply_quant(model, self.quant, self.source).eval()


@dataclass
class DecodeRow:
    """One line of ``bench decode --json``; ``None`` values: not supported at this context."""

    model: str
    context: int
    tokens_per_s: float | None
    ms_per_token: float | None
    state_bytes: int | None
    peak_rss_bytes: int | None
    quant: str = "none"
    engine: str = "torch"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrefillRow:
    """One line of ``bench prefill --json``: ``seconds`` for ``context`` tokens, the process's
    peak RSS, and ``activation_bytes``, the RSS the prefill added over the loaded model (sampled
    every few milliseconds during the pass)."""

    model: str
    context: int
    seconds: float | None
    tokens_per_s: float | None
    state_bytes: int | None
    peak_rss_bytes: int | None
    activation_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- estimates -------------------------------------------------------------------------------


def weight_bytes(model: Decoder) -> int:
    """Bytes of the model's weights (tied ones once; quantized codes and scales included)."""
    from linearize.models.quantize import weight_bytes as quantized_aware

    return quantized_aware(model)


def memory_estimate(model: Decoder, context: int, piece: int | None = None) -> dict[str, int]:
    """What a run at ``context`` tokens will allocate: a second copy of the weights (the fresh
    process), the state (KV caches twice: they grow by doubling), and the prefill's activations
    (per token: the residual stream, q/k/v/features and the MLP's three intermediates) for
    ``piece`` tokens at a time (default: all at once), and the prompt's token ids."""
    c, size = model.config, model.dtype.itemsize
    state = model.state_nbytes(context)
    grow = state - model.state_nbytes(0)
    per_token = 8 * c.hidden_size + 4 * c.intermediate_size + 8 * c.num_heads * c.head_dim
    return {
        "weights": weight_bytes(model),
        "state": state + grow,
        "activations": min(context, piece or context) * per_token * size,
        "prompt": context * 8,  # the token ids (int64)
    }


def check_memory(model: Decoder, label: str, context: int, piece: int | None = None) -> None:
    """Refuse (``ValueError`` with the estimate) a context the free memory cannot hold."""
    estimate = memory_estimate(model, context, piece)
    need, free = sum(estimate.values()), available_memory_bytes()
    if need > MEMORY_HEADROOM * free:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in estimate.items())
        raise ValueError(
            f"{label} at context {context} needs about {format_bytes(need)} ({parts}); only "
            f"{format_bytes(free)} is available: use smaller --contexts"
        )


def supports_context(model: Decoder, context: int) -> bool:
    """False when softmax layers would run past the positions the model was trained on."""
    has_softmax = any(name == "softmax" for name in model.attention_names())
    return not has_softmax or context <= model.config.max_position_embeddings


def describe(model: Decoder) -> dict[str, Any]:
    """What a benchmark record keeps about a model: its family (softmax / linear / hybrid), its
    attentions, weight bytes and trained context."""
    names = model.attention_names()
    family = (
        "softmax" if set(names) == {"softmax"} else "hybrid" if "softmax" in names else "linear"
    )
    return {
        "family": family,
        "attention": ",".join(sorted(set(names))),
        "weight_bytes": weight_bytes(model),
        "max_position_embeddings": model.config.max_position_embeddings,
    }


def physical_bound(weights: int, state: int, bandwidth: float) -> float:
    """Tokens/s if every decode step only streamed the weights and the state from memory once."""
    return bandwidth / (weights + state)


# --- one measurement (runs in the worker process) --------------------------------------------


def _random_ids(model: Decoder, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (1, n), generator=g)


# The prompt of a decode row is prefilled in pieces of this many tokens (the state carried), so
# that 128k contexts fit in memory.
PREFILL_PIECE = 8192


def _prefill(model: Decoder, ids: torch.Tensor):
    state = None
    for start in range(0, ids.shape[1], PREFILL_PIECE):
        piece = ids[:, start : start + PREFILL_PIECE]
        hidden, state = model.forward_hidden(piece, state=state, form="chunk")
    return hidden, state


class ModelDecoding:
    """One (model, context) decode run (a :class:`Decoding`): its prompt prefilled, then one
    greedy step per :meth:`step` on the engine (or the PyTorch recurrent form), ending at
    ``context`` after ``span`` steps."""

    @torch.no_grad()
    def __init__(self, model: Decoder, context: int, span: int, engine: str) -> None:
        from linearize.engine import build_engine, resolve_engine

        prompt = context - span
        if prompt < 1:
            raise ValueError(f"context {context} must exceed warmup + steps = {span}")
        self.model, self.context = model, context
        self.engine = resolve_engine(engine, model)
        self.quant = "none" if model.quantization is None else model.quantization.quant
        self.fast = build_engine(
            self.engine, model, max_context=context, threads=torch.get_num_threads()
        )
        hidden, self.state = _prefill(model, _random_ids(model, prompt))
        self.token = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        if self.fast is not None:
            self.fast.load_state(self.state)
            self.token, self.state = int(self.token), None
        self.times: list[float] = []

    @torch.no_grad()
    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        if self.fast is not None:
            self.token = int(self.fast.step(self.token).argmax())
        else:
            logits, self.state = self.model(self.token, state=self.state, form="recurrent")
            self.token = logits[:, -1].argmax(-1, keepdim=True)
        if timed:
            self.times.append(time.perf_counter() - start)

    def result(self) -> dict[str, Any]:
        state_bytes = self.fast.nbytes() if self.fast is not None else self.state.nbytes()
        return {
            "times": self.times,
            "state_bytes": state_bytes,
            "engine": self.engine,
            "quant": self.quant,
        }


class Decoding(Protocol):
    """A decode run, prefilled when made: one greedy step per :meth:`step` (its time kept when
    ``timed``), then :meth:`result` (``times`` in s, and what else the row reports)."""

    def step(self, timed: bool) -> None: ...

    def result(self) -> dict[str, Any]: ...


class Peer(Protocol):
    """Another program decoding beside ours in ``bench decode`` (llama.cpp): its rows are
    labelled ``label``."""

    label: str

    def supports(self, context: int) -> bool: ...

    def decoding(self, context: int, span: int) -> Decoding:
        """A run in this process, prefilled so that ``span`` steps end at ``context``."""
        ...

    def measure(self, context: int, steps: int, warmup: int) -> tuple[dict[str, Any], int]:
        """The run's :meth:`Decoding.result` and peak RSS, in a fresh process."""
        ...

    def row(self, context: int, result: dict[str, Any] | None, peak: int | None) -> DecodeRow: ...


# Timed steps each run takes in a turn of :func:`take_turns`.
DECODE_TURN = 8


def take_turns(decodings: list[Decoding], steps: int, warmup: int) -> list[dict[str, Any]]:
    """Step every run ``warmup`` times untimed, then ``steps`` timed, in turns of
    :data:`DECODE_TURN` steps each: a machine whose speed drifts over minutes then biases none
    of the runs against the others, as timing one after the other would."""
    for _ in range(warmup):
        for decoding in decodings:
            decoding.step(timed=False)
    for done in range(0, steps, DECODE_TURN):
        for decoding in decodings:
            for _ in range(min(DECODE_TURN, steps - done)):
                decoding.step(timed=True)
    return [decoding.result() for decoding in decodings]


def time_decodes(
    runs: list[tuple[Decoder, int, str]],
    steps: int = 32,
    warmup: int = DEFAULT_DECODE_WARMUP,
) -> list[dict[str, Any]]:
    """:func:`time_decode` of several ``(model, context, engine)`` runs in one process, their
    steps taken in turns (:func:`take_turns`). Every run is prefilled before the first step (each
    keeps its state: the memory of all of them at once)."""
    decodings = []
    for model, context, engine in runs:
        decodings.append(ModelDecoding(model, context, warmup + steps, engine))
        logger.info("decode @ %d prefilled (%d of %d)", context, len(decodings), len(runs))
    return take_turns(decodings, steps, warmup)


def time_decode(
    model: Decoder,
    context: int,
    steps: int = 32,
    warmup: int = DEFAULT_DECODE_WARMUP,
    engine: str = "torch",
) -> dict[str, Any]:
    """Step times (s) of greedy recurrent decoding ending at ``context``, the state bytes, and
    the engine that ran (``auto`` resolved; see :mod:`linearize.engine`)."""
    return time_decodes([(model, context, engine)], steps, warmup)[0]


class _RssSampler:
    """The highest RSS seen while the block runs (a thread polls /proc every ``period`` s)."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.peak = period, current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


@torch.no_grad()
def time_prefill(model: Decoder, context: int) -> dict[str, Any]:
    """Seconds to prefill ``context`` tokens (chunk form, LM head on the last one), the state
    bytes after it and the RSS the pass added."""
    model.forward_hidden(_random_ids(model, min(context, 64), seed=1), form="chunk")
    ids = _random_ids(model, context)
    before = current_rss_bytes()
    with _RssSampler() as sampler:
        start = time.perf_counter()
        hidden, state = model.forward_hidden(ids, form="chunk")
        model.lm_head(hidden[:, -1]).argmax(-1)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "state_bytes": state.nbytes(),
        "activation_bytes": max(0, sampler.peak - before),
    }


def _worker(
    kind: str, spec: ModelSpec, context: int, options: dict[str, Any], threads: int
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = spec.load()
    if kind == "decode":
        return time_decode(model, context, engine=spec.engine, **options)
    return time_prefill(model, context, **options)


def _measure(
    kind: str, spec: ModelSpec, context: int, options: dict[str, Any], model: Decoder | None
) -> tuple[dict[str, Any], int]:
    """The run's result and peak RSS: in a fresh process, or with ``model`` (a prefill) in this
    one; decode runs in this process take turns instead (:func:`bench_decode`)."""
    if model is None:
        # The fresh process uses as many threads as this one.
        return run_isolated(_worker, kind, spec, context, options, torch.get_num_threads())
    return time_prefill(model, context, **options), peak_rss_bytes()


# --- the benchmarks --------------------------------------------------------------------------


def _grid(
    kind: str,
    specs: list[ModelSpec],
    contexts: tuple[int, ...],
    progress: Progress | None,
    on_model: OnModel | None,
) -> Iterator[tuple[int, ModelSpec, Decoder, int]]:
    """``(model index, spec, model, context)`` with the models taking turns at each context, so
    a machine whose load drifts biases no model in particular. Every model is loaded and every
    memory estimate checked before the first measurement."""
    models = [spec.load() for spec in specs]
    for spec, model in zip(specs, models, strict=True):
        if on_model is not None:
            on_model(spec, model)
        for context in contexts:
            if kind == "prefill":
                check_memory(model, spec.label, context)
            elif supports_context(model, context):
                # A decode row's prompt is prefilled in pieces (see _prefill).
                check_memory(model, spec.label, context, PREFILL_PIECE)
    for context in contexts:
        for i, (spec, model) in enumerate(zip(specs, models, strict=True)):
            if progress is not None:
                progress(f"{kind} {spec.label} @ {context}")
            yield i, spec, model, context


def bench_decode(
    specs: list[ModelSpec],
    contexts: tuple[int, ...] = DEFAULT_DECODE_CONTEXTS,
    *,
    steps: int = 32,
    warmup: int = DEFAULT_DECODE_WARMUP,
    isolate: bool = True,
    progress: Progress | None = None,
    on_model: OnModel | None = None,
    peers: Sequence[Peer] = (),
) -> list[DecodeRow]:
    """One :class:`DecodeRow` per (model, context), ordered by model then context, then the
    ``peers``' rows; see the module doc for the protocol. ``on_model(spec, model)`` is called
    once per model after loading (to describe it)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"decode needs steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    _check_contexts(contexts, minimum=steps + warmup + 1)
    span = steps + warmup
    # Runs measured in this process, together: (row order, make the run, its row from a result).
    together: list[tuple[int, Callable[[], Decoding], Callable[..., DecodeRow]]] = []
    rows = []
    for i, spec, model, context in _grid("decode", specs, contexts, progress, on_model):
        row = partial(_decode_row, spec, context)
        if not supports_context(model, context):
            logger.info(
                "%s: context %d not supported (past its trained positions)", spec.label, context
            )
            rows.append(
                (i, DecodeRow(spec.label, context, None, None, None, None, spec.quant or "none"))
            )
        elif isolate:
            options = {"steps": steps, "warmup": warmup}
            rows.append((i, row(*_measure("decode", spec, context, options, None))))
        else:
            make = partial(ModelDecoding, model, context, span, spec.engine)
            together.append((i, make, row))
    for j, peer in enumerate(peers, start=len(specs)):
        for context in contexts:
            if progress is not None:
                progress(f"decode {peer.label} @ {context}")
            row = partial(peer.row, context)
            if not peer.supports(context):
                rows.append((j, row(None, None)))
            elif isolate:
                rows.append((j, row(*peer.measure(context, steps, warmup))))
            else:
                together.append((j, partial(peer.decoding, context, span), row))
    if together:
        # In this process: every run prefilled, then their steps in turns (take_turns).
        decodings = []
        for _, make, _ in together:
            decodings.append(make())
            logger.info("decode: %d of %d runs prefilled", len(decodings), len(together))
        results = take_turns(decodings, steps, warmup)
        for (i, _, row), result in zip(together, results, strict=True):
            rows.append((i, row(result, peak_rss_bytes())))
    return [row for _, row in sorted(rows, key=lambda ir: (ir[0], ir[1].context))]


def _decode_row(spec: ModelSpec, context: int, result: dict[str, Any], peak: int) -> DecodeRow:
    ms = 1000 * statistics.median(result["times"])
    return DecodeRow(
        spec.label,
        context,
        1000 / ms,
        ms,
        result["state_bytes"],
        peak,
        result["quant"],
        result["engine"],
    )


def bench_prefill(
    specs: list[ModelSpec],
    contexts: tuple[int, ...] = DEFAULT_PREFILL_CONTEXTS,
    *,
    isolate: bool = True,
    progress: Progress | None = None,
    on_model: OnModel | None = None,
) -> list[PrefillRow]:
    """One :class:`PrefillRow` per (model, context), ordered by model then context. Softmax
    models are timed past their trained positions too: the compute does not depend on what the
    positions mean."""
    _check_contexts(contexts, minimum=1)
    rows = []
    for i, spec, model, context in _grid("prefill", specs, contexts, progress, on_model):
        result, peak = _measure("prefill", spec, context, {}, None if isolate else model)
        seconds = result["seconds"]
        row = PrefillRow(
            spec.label,
            context,
            seconds,
            context / seconds,
            result["state_bytes"],
            peak,
            result["activation_bytes"],
        )
        rows.append((i, row))
    return [row for _, row in sorted(rows, key=lambda ir: (ir[0], ir[1].context))]


def _check_contexts(contexts: tuple[int, ...], minimum: int) -> None:
    if not contexts:
        raise ValueError("no contexts given")
    for c in contexts:
        if not isinstance(c, int) or c < minimum:
            raise ValueError(f"context {c!r} must be an integer >= {minimum}")


def parse_contexts(text: str) -> tuple[int, ...]:
    """``"1024,8k,32k"`` → ``(1024, 8192, 32768)``."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            values.append(int(part.removesuffix("k")) * scale)
        except ValueError:
            raise ValueError(f"bad context {part!r} in {text!r}: use e.g. 1024,8k,32768") from None
    return tuple(values)
