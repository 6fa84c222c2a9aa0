"""Decode and prefill benchmarks as library functions returning rows.

**Decode** at context ``C``: prefill ``C − warmup − steps`` random tokens in one pass (chunk form
for linear layers, SDPA for softmax ones), then decode ``warmup + steps`` tokens greedily in the
recurrent form, timing each step (forward + argmax); the row reports the median step, so the
timed steps end exactly at context ``C``. **Prefill** of ``C`` tokens: one pass (chunk form) plus
the LM head on the last token, after a short warm-up pass.

Each (model, context) runs in a fresh process by default (``isolate=True``), so
``peak_rss_bytes`` is that process's own high-water mark: interpreter, torch, the model weights
and the run. A context the memory cannot hold is refused before anything is allocated, with the
estimate. A softmax model's decode stops at its ``max_position_embeddings``: past it the row is
reported as not supported (``None`` values) rather than measured. Runs that are compared take
turns (:func:`take_turns`), so a machine whose speed drifts over minutes biases none of them:
at each context every decode run, each peer's (llama.cpp) included, is prefilled in a process of
its own (:class:`IsolatedDecoding`), then they step in turns, the others waiting. In one process
(``isolate=False``) every run of every context is prefilled first, then all take turns, holding
all their states at once. Every run of ours is checked against the memory before the first
measurement, and so is every group of them held at once. Prefill rows run one after another,
the models taking turns at each context, each peer's (llama.cpp) after them.
"""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol

import torch

from linearize.bench.memory import (
    RssSampler,
    available_memory_bytes,
    format_bytes,
    peak_rss_bytes,
    run_isolated,
)
from linearize.engine import one_torch_thread
from linearize.models.decoder import PREFILL_SEGMENT, Decoder

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
    # Attention options (``--option``): with ``attention``, the linearization's; else set on the
    # model's linear layers, keeping their parameters (``linearize.models.reconfigure``).
    options: tuple[tuple[str, Any], ...] = ()
    # The onnx engine's keys and values (``--kv-type``; None: its default).
    kv_type: str | None = None

    @property
    def label(self) -> str:
        label = self.source if self.attention is None else f"{self.source}+{self.attention}"
        if self.options:
            label += "(" + ",".join(f"{k}={v}" for k, v in self.options) + ")"
        if self.quant not in (None, "none"):
            label += f"+{self.quant}"
        return label if self.engine in ("torch", "auto") else f"{label}@{self.engine}"

    def load(self) -> Decoder:
        from linearize.models import linearize, load, reconfigure
        from linearize.models.quantize import apply_quant

        model = load(self.source)
        if self.attention is not None:
            linearize(model, {"name": self.attention, **dict(self.options)})
        elif self.options:
            reconfigure(model, dict(self.options))
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
    # The element type of the keys and values a softmax window or KV cache holds (the onnx
    # engine's kv_type, llama.cpp's cache: float16); None where not reported (the torch engine's
    # state is the model's dtype).
    kv_type: str | None = None
    # The bytes one step at this context reads from memory (what physical_bound divides): the
    # weights on its engine (the onnx engine's step graph, the torch engine's model, llama.cpp's
    # GGUF tensors) and the state a step reads (the filled part of the onnx engine's rings).
    # None where not reported.
    read_bytes: int | None = None
    # The median step of each round (``bench decode --repeat``), in ms; only then a key.
    round_ms: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        if row["round_ms"] is None:
            del row["round_ms"]
        return row


@dataclass
class PrefillRow:
    """One line of ``bench prefill --json``: ``seconds`` for ``context`` tokens, the process's
    peak RSS, and ``activation_bytes``, the RSS the prefill added over the loaded model (sampled
    every few milliseconds during the pass); the weights and the engine that ran it."""

    model: str
    context: int
    seconds: float | None
    tokens_per_s: float | None
    state_bytes: int | None
    peak_rss_bytes: int | None
    activation_bytes: int | None
    quant: str = "none"
    engine: str = "torch"

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


def _quant(model: Decoder) -> str:
    """The model's ``--quant`` value (``none``: fp weights)."""
    return "none" if model.quantization is None else model.quantization.quant


def describe(model: Decoder) -> dict[str, Any]:
    """What a benchmark record keeps about a model: its family (softmax / linear / hybrid), its
    attentions, weights (``quant``, bytes) and trained context."""
    names = model.attention_names()
    family = (
        "softmax" if set(names) == {"softmax"} else "hybrid" if "softmax" in names else "linear"
    )
    return {
        "family": family,
        "attention": ",".join(sorted(set(names))),
        "quant": _quant(model),
        "weight_bytes": weight_bytes(model),
        "max_position_embeddings": model.config.max_position_embeddings,
    }


def step_read_bytes(
    read_bytes: int | None, weight_bytes: int | None, state_bytes: int | None
) -> int | None:
    """The bytes a step reads: a row's own ``read_bytes``, or for rows without it (records
    before the key) the model's ``weight_bytes`` and its whole ``state_bytes``."""
    if read_bytes is not None or None in (weight_bytes, state_bytes):
        return read_bytes
    return weight_bytes + state_bytes


def physical_bound(read_bytes: int, bandwidth: float) -> float:
    """Tokens/s if every decode step only streamed the ``read_bytes`` it reads (weights and
    state) from memory once, at ``bandwidth`` bytes/s."""
    return bandwidth / read_bytes


# --- one measurement (runs in the worker process) --------------------------------------------


def _random_ids(model: Decoder, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (1, n), generator=g)


class ModelDecoding:
    """One (model, context) decode run (a :class:`Decoding`): its prompt prefilled, then one
    greedy step per :meth:`step` on the engine (or the PyTorch recurrent form), ending at
    ``context`` after ``span`` steps. The steps run on ``threads`` (default: torch's now); the
    prefill, which is not timed, on as many as torch has when it starts (a run in its own process
    prefills on every core: a 128k prompt in half the time on two)."""

    @torch.no_grad()
    def __init__(
        self,
        model: Decoder,
        context: int,
        span: int,
        engine: str,
        threads: int | None = None,
        kv_type: str | None = None,
    ) -> None:
        from linearize.engine import build_engine, resolve_engine

        prompt = context - span
        if prompt < 1:
            raise ValueError(f"context {context} must exceed warmup + steps = {span}")
        self.model, self.context = model, context
        self.engine = resolve_engine(engine, model)
        self.quant = _quant(model)
        threads = threads or torch.get_num_threads()
        self.fast = build_engine(
            self.engine, model, max_context=context, threads=threads, kv_type=kv_type
        )
        # In segments of PREFILL_SEGMENT tokens, as generate feeds a prompt: 128k contexts fit.
        last, self.state = model.prefill(_random_ids(model, prompt))
        self.token = model.lm_head(last).argmax(-1, keepdim=True)
        torch.set_num_threads(threads)
        if self.fast is not None:
            self.fast.load_state(self.state)
            self.token, self.state = int(self.token), None
        self.times: list[float] = []

    @torch.no_grad()
    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        if self.fast is not None:
            with one_torch_thread():  # as generate samples between the engine's runs
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
            "kv_type": getattr(self.fast, "kv_type", None),
            "read_bytes": (
                weight_bytes(self.model) + state_bytes
                if self.fast is None
                else self.fast.read_bytes()
            ),
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

    def run(self, context: int, span: int) -> tuple[Callable[..., Decoding], tuple[Any, ...]]:
        """How to make its run ending at ``context`` after ``span`` steps: ``make(*args)``,
        ``make`` module-level and ``args`` picklable (it may run in a fresh process)."""
        ...

    def row(self, context: int, result: dict[str, Any] | None, peak: int | None) -> DecodeRow: ...


class IsolatedDecoding:
    """A :class:`Decoding` made (``make(*args)``: a module-level callable, picklable arguments)
    and stepped in a fresh (spawned) process of its own, which waits between the steps it is
    told to take: it takes turns with other runs, and its ``result()`` carries that process's
    own ``peak_rss_bytes``. An error in the child is raised here as a ``RuntimeError`` with its
    message; the child exits after ``result()``."""

    def __init__(self, make: Callable[..., Decoding], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_decoding, args=(child, make, args))
        self._process.start()
        child.close()
        self._answer()  # made: its prompt prefilled

    def _answer(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(
                f"the decode run's process died (exit code {self._process.exitcode})"
            ) from None
        if status != "ok":
            self._process.join()
            raise RuntimeError(value)
        return value

    def step(self, timed: bool) -> None:
        self._conn.send(("step", timed))
        self._answer()

    def result(self) -> dict[str, Any]:
        self._conn.send(("result",))
        result, peak = self._answer()
        self._process.join()
        return {**result, "peak_rss_bytes": peak}

    def close(self) -> None:
        """End the child if it still runs (a run given up: another failed)."""
        self._conn.close()  # the child's next read ends it
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _serve_decoding(conn: Any, make: Callable[..., Decoding], args: tuple[Any, ...]) -> None:
    """The child of :class:`IsolatedDecoding`: make the run, then step it when told."""
    try:
        decoding = make(*args)
        conn.send(("ok", None))
        while True:
            try:
                command, *rest = conn.recv()
            except EOFError:  # the parent gave the run up
                return
            if command == "step":
                decoding.step(*rest)
                conn.send(("ok", None))
            else:
                conn.send(("ok", (decoding.result(), peak_rss_bytes())))
                return
    except BaseException as e:  # report every failure to the parent, then exit
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _load_fresh(spec: ModelSpec, threads: int) -> Decoder:
    """``spec``'s model in a fresh process, which uses as many threads as ours."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return spec.load()


def _model_decoding(spec: ModelSpec, context: int, span: int, threads: int) -> ModelDecoding:
    """``spec``'s run in a fresh process (:class:`IsolatedDecoding`): prefilled on every core
    (the other runs wait while a run is made), stepped on ``threads``."""
    torch.manual_seed(0)
    return ModelDecoding(spec.load(), context, span, spec.engine, threads, spec.kv_type)


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


@torch.no_grad()
def time_prefill(
    model: Decoder, context: int, engine: str = "torch", kv_type: str | None = None
) -> dict[str, Any]:
    """Seconds to prefill ``context`` tokens as ``generate`` does (the PyTorch reference:
    :meth:`Decoder.prefill`, the chunk form in segments of ``PREFILL_SEGMENT`` tokens, the LM
    head on the last one; the onnx engine: its :meth:`~linearize.engine.onnx.OnnxEngine.prefill`,
    in chains of ``PREFILL_CHUNK``), the state bytes after it and the RSS the pass added. The
    graphs a run uses are exported and loaded by an untimed prompt first."""
    from linearize.engine import build_engine, resolve_engine

    name = resolve_engine(engine, model)
    threads = torch.get_num_threads()
    fast = build_engine(name, model, max_context=context, threads=threads, kv_type=kv_type)
    if fast is None:
        model.prefill(_random_ids(model, min(context, 64), seed=1))
    else:
        from linearize.engine.onnx import PREFILL_CHUNK

        # A full chunk and the last one's size: the same graphs as the timed prompt.
        warm = PREFILL_CHUNK + context % PREFILL_CHUNK if context >= PREFILL_CHUNK else context
        fast.prefill(_random_ids(model, warm, seed=1)[0].tolist())
    ids = _random_ids(model, context)
    with RssSampler() as sampler:
        start = time.perf_counter()
        if fast is None:
            last, state = model.prefill(ids)
            model.lm_head(last).argmax(-1)
        else:
            fast.prefill(ids[0].tolist()).argmax(-1)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "state_bytes": state.nbytes() if fast is None else fast.nbytes(),
        "activation_bytes": sampler.added,
        "engine": name,
        "quant": _quant(model),
    }


def _prefill_worker(spec: ModelSpec, context: int, threads: int) -> dict[str, Any]:
    return time_prefill(_load_fresh(spec, threads), context, spec.engine, spec.kv_type)


def _measure_prefill(
    spec: ModelSpec, context: int, model: Decoder | None
) -> tuple[dict[str, Any], int]:
    """The prefill's result and peak RSS: in a fresh process (as many threads as this one), or
    with ``model`` in this one."""
    if model is None:
        return run_isolated(_prefill_worker, spec, context, torch.get_num_threads())
    return time_prefill(model, context, spec.engine, spec.kv_type), peak_rss_bytes()


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
                # A decode row's prompt is prefilled in segments (Decoder.prefill).
                check_memory(model, spec.label, context, PREFILL_SEGMENT)
    for context in contexts:
        for i, (spec, model) in enumerate(zip(specs, models, strict=True)):
            if progress is not None:
                progress(f"{kind} {spec.label} @ {context}")
            yield i, spec, model, context


# A run of bench_decode: (row order, label, make the run, its row from a result).
_Run = tuple[int, str, Callable[[], Decoding], Callable[..., DecodeRow]]


def bench_decode(
    specs: list[ModelSpec],
    contexts: tuple[int, ...] = DEFAULT_DECODE_CONTEXTS,
    *,
    steps: int = 32,
    warmup: int = DEFAULT_DECODE_WARMUP,
    isolate: bool = True,
    repeat: int = 1,
    progress: Progress | None = None,
    on_model: OnModel | None = None,
    peers: Sequence[Peer] = (),
) -> list[DecodeRow]:
    """One :class:`DecodeRow` per (model, context), ordered by model then context, then the
    ``peers``' rows; see the module doc for the protocol. With ``repeat`` > 1 every group of
    runs is measured that many times, in rounds (fresh processes each round when isolated: a
    process's speed on a shared VM varies from one process to the next), and a row reports the
    median of all its timed steps and each round's median (``round_ms``). ``on_model(spec,
    model)`` is called once per model after loading (to describe it)."""
    if steps < 1 or warmup < 0 or repeat < 1:
        raise ValueError(
            f"decode needs steps >= 1, warmup >= 0 and repeat >= 1, got {steps}, {warmup} and "
            f"{repeat}"
        )
    _check_contexts(contexts, minimum=steps + warmup + 1)
    span, threads = steps + warmup, torch.get_num_threads()
    # The runs that take turns: by context in their own processes, or all at once here (None).
    groups: dict[int | None, list[_Run]] = {}
    estimates: dict[int | None, list[tuple[str, int]]] = {}
    rows = []
    for i, spec, model, context in _grid("decode", specs, contexts, None, on_model):
        if not supports_context(model, context):
            logger.info(
                "%s: context %d not supported (past its trained positions)", spec.label, context
            )
            rows.append(
                (i, DecodeRow(spec.label, context, None, None, None, None, spec.quant or "none"))
            )
            continue
        if isolate:
            make = partial(IsolatedDecoding, _model_decoding, spec, context, span, threads)
        else:
            make = partial(ModelDecoding, model, context, span, spec.engine, kv_type=spec.kv_type)
        row = partial(decode_row, spec.label, context)
        group = context if isolate else None
        groups.setdefault(group, []).append((i, spec.label, make, row))
        estimate = memory_estimate(model, context, PREFILL_SEGMENT)
        if not isolate:  # one process: the weights are loaded once, already
            estimate["weights"] = 0
        estimates.setdefault(group, []).append((spec.label, sum(estimate.values())))
    for j, peer in enumerate(peers, start=len(specs)):
        for context in contexts:
            row = partial(peer.row, context)
            if not peer.supports(context):
                rows.append((j, row(None, None)))
                continue
            make, args = peer.run(context, span)
            make = partial(IsolatedDecoding, make, *args) if isolate else partial(make, *args)
            groups.setdefault(context if isolate else None, []).append((j, peer.label, make, row))
    for group, needs in estimates.items():
        _check_together(needs, group)
    # Every round's result of each run, by (group, index in it).
    results: dict[tuple[int | None, int], list[dict[str, Any]]] = {}
    for round_ in range(repeat):
        for group, runs in groups.items():
            where = f" @ {group}" if group is not None else ""
            where += f", round {round_ + 1} of {repeat}" if repeat > 1 else ""
            for k, result in enumerate(_take_turns_of(runs, steps, warmup, where, progress)):
                results.setdefault((group, k), []).append(result)
    for group, runs in groups.items():
        for k, (i, _, _, row) in enumerate(runs):
            rounds = results[group, k]
            # A run in its own process reports its peak; here, this process's high-water mark.
            peak = max(r.get("peak_rss_bytes") or peak_rss_bytes() for r in rounds)
            timed = row({**rounds[-1], "times": [t for r in rounds for t in r["times"]]}, peak)
            if repeat > 1:
                timed.round_ms = [1000 * statistics.median(r["times"]) for r in rounds]
            rows.append((i, timed))
    return [row for _, row in sorted(rows, key=lambda ir: (ir[0], ir[1].context))]


def _take_turns_of(
    runs: list[_Run], steps: int, warmup: int, where: str, progress: Progress | None
) -> list[dict[str, Any]]:
    """Make ``runs`` one by one (each prefills), then :func:`take_turns`; if one fails, the
    processes of the others are ended before the error goes on."""
    decodings: list[Decoding] = []
    try:
        for _, label, make, _ in runs:
            if progress is not None:
                progress(f"decode{where}: prefilling {label} ({len(decodings) + 1} of {len(runs)})")
            decodings.append(make())
        if progress is not None:
            turns = f"{len(runs)} runs taking turns" if len(runs) > 1 else "1 run"
            progress(f"decode{where}: {turns}, {warmup} + {steps} steps each")
        return take_turns(decodings, steps, warmup)
    except BaseException:
        for decoding in decodings:
            if isinstance(decoding, IsolatedDecoding):
                decoding.close()
        raise


def _check_together(needs: list[tuple[str, int]], context: int | None) -> None:
    """Refuse runs held at once (a context's processes, or every run in this one) that the free
    memory cannot hold together (each alone is checked by :func:`check_memory`)."""
    need, free = sum(n for _, n in needs), available_memory_bytes()
    if len(needs) > 1 and need > MEMORY_HEADROOM * free:
        where = f"at context {context}" if context is not None else "in one process"
        runs = ", ".join(f"{label} {format_bytes(n)}" for label, n in needs)
        raise ValueError(
            f"{len(needs)} decode runs taking turns {where} need about {format_bytes(need)} "
            f"together ({runs}); only {format_bytes(free)} is available: use fewer --model or "
            "smaller --contexts"
        )


def decode_row(label: str, context: int, result: dict[str, Any], peak: int) -> DecodeRow:
    """The row of a timed run: its median step, and the ``state_bytes``, ``quant`` and
    ``engine`` its result names."""
    ms = 1000 * statistics.median(result["times"])
    return DecodeRow(
        label,
        context,
        1000 / ms,
        ms,
        result["state_bytes"],
        peak,
        result["quant"],
        result["engine"],
        result.get("kv_type"),
        result.get("read_bytes"),
    )


class PrefillPeer(Protocol):
    """Another tool timed beside our models in ``bench prefill`` (llama.cpp): ``prefill(context)``
    gives a module-level function and its arguments, whose call (in a fresh process unless
    ``isolate=False``) returns ``seconds``, ``state_bytes``, ``activation_bytes``, ``quant`` and
    ``engine`` for a prompt of ``context`` tokens, as :func:`time_prefill` does."""

    label: str

    def prefill(self, context: int) -> tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]: ...


def prefill_row(label: str, context: int, result: dict[str, Any], peak: int) -> PrefillRow:
    """The row of a timed prefill (:func:`time_prefill`'s result, or a peer's)."""
    seconds = result["seconds"]
    return PrefillRow(
        label,
        context,
        seconds,
        context / seconds,
        result["state_bytes"],
        peak,
        result["activation_bytes"],
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
    peers: Sequence[PrefillPeer] = (),
) -> list[PrefillRow]:
    """One :class:`PrefillRow` per (model, context), ordered by model then context, then the
    ``peers``' rows (each context's peer runs right after its models'). Softmax models are
    timed past their trained positions too: the compute does not depend on what the positions
    mean."""
    _check_contexts(contexts, minimum=1)
    rows = []
    for i, spec, model, context in _grid("prefill", specs, contexts, progress, on_model):
        result, peak = _measure_prefill(spec, context, None if isolate else model)
        rows.append((i, prefill_row(spec.label, context, result, peak)))
        if i < len(specs) - 1:
            continue
        for j, peer in enumerate(peers, start=len(specs)):
            if progress is not None:
                progress(f"prefill {peer.label} @ {context}")
            work, args = peer.prefill(context)
            result, peak = run_isolated(work, *args) if isolate else (work(*args), peak_rss_bytes())
            rows.append((j, prefill_row(peer.label, context, result, peak)))
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
