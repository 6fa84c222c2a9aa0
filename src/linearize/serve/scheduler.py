"""Continuous batching: one worker thread decodes every active request together, step by step.

Each request is a row with its own :class:`~linearize.generation.decode.Decoding` (sampler,
position, state, proposer). Between steps, queued requests join (their prompt is prefilled on
top of the longest cached prefix state) and finished or cancelled ones leave, dropping their
state. Plain rows keep their states in one :class:`~linearize.models.decoder.DecodeRows` the
scheduler owns: a request joins it with its prefilled state, a step feeds every plain row's
last token through one ``model.step_rows`` call (the weight matmuls run once for all rows, and
sliding-window linear attention attends for all rows at once, each at its own position, updating
the rows in place), and a finished or cancelled request leaves it. With a fast engine
(``engine``: a quantized model's default), each plain row's state moves into a row of one of
``workers`` groups (:class:`~linearize.engine.ring.RingRows`) at its first step instead: each
group steps its rows in one run of the engine's step graph, the groups at once, each on a thread
of a pool. Rows decoding speculatively keep their own state and take their own ``Decoding.step``
(propose → verify → accept → commit). The sampler, stop rules and speculative pipeline are the
generation package's, so a request yields exactly what ``linearize generate`` yields for it
alone (on the engine: what ``generate`` yields on the engine).

The model only ever runs on this thread (and the engine's runs on its pool); the event loop talks
to it through :meth:`submit` and the ``emit`` callback of each job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from linearize.engine import one_torch_thread
from linearize.generation.config import GenerationConfig
from linearize.generation.decode import PROPOSERS, Decoding, Output
from linearize.generation.medusa import MedusaHeads
from linearize.models.decoder import Decoder, DecodeRows, ModelState
from linearize.models.state import copy_state, row_views
from linearize.serve.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every row is busy and the queue is full: the client should retry later (429)."""


@dataclass
class Event:
    """What the worker tells a job's owner: ``delta`` (text and the token ids behind it),
    ``done`` (``info``: finish reason, usage, timings) or ``error`` (``info["status"]``)."""

    kind: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One request handed to the scheduler. ``boundaries``: prefix lengths worth caching (the
    end of each chat message), besides the whole prompt."""

    request_id: str
    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    boundaries: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """A request with a row: its decoding, its output, its timings and, while its prompt is
    being prefilled, the state so far (``done`` prompt tokens, ``cached`` of them from the
    prefix cache)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.decoding: Decoding | None = None
        self.output: Output | None = None
        self.state: ModelState | None = None
        self.done = self.cached = 0
        self.started = time.perf_counter()
        self.prefill_s = 0.0
        self.first_token: float | None = None

    def nbytes(self) -> int:
        state = self.state if self.state is not None else getattr(self.decoding, "state", None)
        return 0 if state is None else state.nbytes()


class Scheduler:
    """``start()``, ``submit(job)`` (raises :class:`QueueFull`), ``stats()``, ``stop()``."""

    def __init__(
        self,
        model: Decoder,
        cache: PrefixCache,
        *,
        max_sessions: int,
        max_queue: int,
        prefill_chunk: int = 512,
        heads: MedusaHeads | None = None,
        engine: Any = None,
        workers: int = 1,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.cache, self.heads = model, cache, heads
        # A fast engine (linearize.engine) steps the plain rows: ``workers`` groups of rows
        # (RingRows, each group one run of the step graph for all its rows), the groups at once,
        # each on a thread of its own; None: one batched PyTorch step (DecodeRows).
        self.engine = engine
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._groups: list[Any] = []  # created on first use
        self._group_of: dict[_Row, Any] = {}
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="linearize-row")
            if engine is not None and workers > 1
            else None
        )
        self.prefill_chunk = prefill_chunk
        self.max_sessions, self.max_queue = max_sessions, max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._rows: list[_Row] = []
        self._joining: list[_Row] = []  # taken from the queue, their prompts being prefilled
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # One calibration per speculative mode, measured by the first request that needs it.
        self._calibrations: dict[str, Any] = {}
        # The states of the plain rows (created by the worker on first use) and their bytes.
        self._batch: DecodeRows | None = None
        self._batch_bytes = 0
        self.steps = 0  # batched decode steps
        self.row_steps = 0  # rows over those steps (row_steps / steps: the mean batch)
        self.completed = 0
        self.cancelled = 0
        self.prefilled_together = 0  # rows whose prompt was fed in a pass shared with others

    # --- the event loop's side ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the scheduler is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="linearize-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._wakeup:
            waiting = sum(not j.cancelled.is_set() for j in self._queue)
            busy = len(self._rows) + len(self._joining)
            if busy + waiting >= self.max_sessions + self.max_queue:
                raise QueueFull(
                    f"{busy} of {self.max_sessions} sessions are busy and "
                    f"{waiting} of {self.max_queue} queue places are taken"
                )
            self._queue.append(job)
            self._wakeup.notify()

    def wake(self) -> None:
        """Look at the queue and the rows again (after a cancellation)."""
        with self._wakeup:
            self._wakeup.notify()

    def stats(self) -> dict[str, Any]:
        with self._wakeup:
            rows = self._rows + self._joining
            prefilling = len(self._joining)
            queued = sum(not j.cancelled.is_set() for j in self._queue)
        return {
            "active": len(rows),
            "prefilling": prefilling,
            "queued": queued,
            "max_sessions": self.max_sessions,
            "max_queue": self.max_queue,
            "state_bytes": sum(r.nbytes() for r in rows) + self._batch_bytes + self._ring_bytes(),
            "steps": self.steps,
            "row_steps": self.row_steps,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "prefilled_together": self.prefilled_together,
            "prefix_cache": self.cache.stats(),
        }

    # --- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._wakeup:
                    while not (self._stopping or self._queue or self._joining or self._rows):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    while self._queue and len(self._rows) + len(self._joining) < self.max_sessions:
                        job = self._queue.popleft()
                        if not job.cancelled.is_set():
                            self._joining.append(_Row(job))
                # A chunk of each new prompt, then a step of every row: a long prompt delays
                # the others by one chunk per step, not by its whole prefill.
                self._prefill_together()
                for row in list(self._joining):
                    self._prefill(row)
                self._step()
                self._leave()
        for row in self._rows:
            self._finish(row, "cancelled")
        self._rows.clear()
        self._joining.clear()
        self._batch, self._batch_bytes = None, 0
        self._groups, self._group_of = [], {}

    def _prefill(self, row: _Row) -> None:
        """Feed the next chunk of ``row``'s prompt (up to a cacheable boundary); with the last
        chunk, sample its first token and move it to the decoded rows."""
        job = row.job
        tokens = None
        try:
            if job.cancelled.is_set():
                self.cancelled += 1
            elif self._prefill_chunk(row):
                return
            else:
                # The last chunk, fed by the decoding itself: it samples the first token.
                tokens = row.decoding.prefill(job.prompt, row.state)
                row.state = None
        except Exception as e:
            self._prefill_failed(row, e)
        self._joined(row, tokens)

    def _prefill_failed(self, row: _Row, error: Exception) -> None:
        """Tell the client (400 for what it caused); the others keep being served."""
        if isinstance(error, ValueError):
            row.job.emit(Event("error", info={"status": 400, "message": str(error)}))
            return
        logger.exception("request %s failed in prefill", row.job.request_id)
        message = f"prefill failed: {error}"
        row.job.emit(Event("error", info={"status": 500, "message": message}))

    def _joined(self, row: _Row, tokens: list[int] | None) -> None:
        """``row`` is prefilled (``tokens``: its first) or failed (``None``): it stops joining."""
        with self._wakeup:
            self._joining.remove(row)
            if tokens is not None:
                self._rows.append(row)
        if tokens is None:
            return
        decoding = row.decoding
        if decoding.calibration is not None:
            self._calibrations.setdefault(row.job.config.speculative, decoding.calibration)
        row.prefill_s = time.perf_counter() - row.started
        self._emit(row, tokens)

    def _prefill_together(self) -> None:
        """New rows whose whole prompt is one chunk with no cached prefix, fed in one pass per
        prompt length: prompts that arrive together share the weight matmuls. (Any row this
        leaves out, or whose pass fails, is prefilled alone by ``_prefill``.)"""
        groups: dict[int, list[_Row]] = collections.defaultdict(list)
        for row in self._joining:
            prompt = row.job.prompt
            if row.job.cancelled.is_set() or len(prompt) > self.prefill_chunk:
                continue
            if any(0 < b < len(prompt) for b in row.job.boundaries):
                continue
            try:
                self._start(row)
            except Exception:  # reported when the row is prefilled alone
                continue
            if row.done == 0:
                groups[len(prompt)].append(row)
        for rows in groups.values():
            if len(rows) < 2:
                continue
            ids = torch.tensor([r.job.prompt for r in rows], device=self.model.device)
            try:
                last, state = self.model.prefill(ids)
            except Exception:
                logger.exception("a batched prefill failed: prefilling its rows one by one")
                continue
            self.prefilled_together += len(rows)
            for i, (row, row_state) in enumerate(zip(rows, row_views(state), strict=True)):
                tokens = None
                try:
                    if row.job.config.speculative != "none":
                        # A speculative row keeps its state (and may cache it when done): its
                        # own copy, not a view holding the whole batch.
                        row_state = copy_state(row_state)
                    # A plain row's view is copied into its decoding rows at its first step.
                    tokens = row.decoding.prefilled(row.job.prompt, last[i], row_state)
                except Exception as e:
                    self._prefill_failed(row, e)
                self._joined(row, tokens)

    def _start(self, row: _Row) -> None:
        """On the row's first chunk: its decoding, its output, the longest cached prefix."""
        if row.decoding is not None:
            return
        model, config, prompt = self.model, row.job.config, row.job.prompt
        proposer = PROPOSERS[config.speculative](model, config, self.heads, None)
        calibration = self._calibrations.get(config.speculative)
        decoding = Decoding(model, config, proposer, calibration)
        row.output = Output(model, config)
        row.state, row.cached = self.cache.lookup(prompt)
        row.done = row.cached
        row.decoding = decoding

    def _prefill_chunk(self, row: _Row) -> bool:
        """Start the row's decoding (from the longest cached prefix) on first call; feed one
        chunk of the prompt unless only the last one is left. Returns whether it fed one."""
        job, model, prompt = row.job, self.model, row.job.prompt
        self._start(row)
        ahead = [b for b in job.boundaries if b > row.done]
        end = min(row.done + self.prefill_chunk, len(prompt), *ahead)
        if end == len(prompt):
            return False
        ids = torch.tensor([prompt[row.done : end]], device=model.device)
        _, row.state = model.forward_hidden(ids, state=row.state)
        row.done = end
        if end in job.boundaries:
            self.cache.put(prompt[:end], row.state)
        return True

    def _step(self) -> None:
        rows = [r for r in self._rows if r.output.reason is None and not r.job.cancelled.is_set()]
        plain = [r for r in rows if not r.decoding.speculating]
        if plain and self.engine is not None:
            self._step_on_engine(plain)
        elif plain:
            batch = self._plain_rows(plain)
            self.steps += 1
            self.row_steps += len(batch)
            try:
                ids = [[row.decoding.root] for row in batch.keys]
                logits = self.model.step_rows(torch.tensor(ids, device=self.model.device), batch)
                for i, row in enumerate(list(batch.keys)):
                    self._emit(row, row.decoding.advance(logits[i, -1], None))
            except Exception as e:
                logger.exception("a batched decode step failed")
                for row in batch.keys:
                    self._fail(row, e)
        for row in rows:
            if row.decoding.speculating:
                try:
                    self._emit(row, row.decoding.step())
                except Exception as e:
                    logger.exception("request %s failed in a speculative step", row.job.request_id)
                    self._fail(row, e)

    def _step_on_engine(self, plain: list[_Row]) -> None:
        """A step of every plain row on the engine: a row joins the smallest group with its
        PyTorch state (after its prompt) at its first step; each group steps its rows in one
        run, the groups at once."""
        self.steps += 1
        self.row_steps += len(plain)
        engine = self.engine
        if not self._groups:
            self._groups = [engine.rows() for _ in range(self.workers)]
        for row in plain:
            if row not in self._group_of:
                group = min(self._groups, key=len)
                engine.join(group, row, row.decoding.state)
                row.decoding.state = None
                self._group_of[row] = group
        busy = [group for group in self._groups if len(group)]

        def step(group) -> torch.Tensor | Exception:
            try:
                return engine.step_rows(group, [row.decoding.root for row in group.keys])
            except Exception as e:  # reported below, on this thread
                return e

        # The groups take the cores: PyTorch (sampling) steps on one thread meanwhile, or its
        # idle threads spin on the cores the groups run on (one stream of the default model in
        # int4: 55 against 84 tokens/s); prompts keep every thread.
        stepping = set(plain)
        with one_torch_thread():
            if self._pool is None or len(busy) == 1:
                results = [step(group) for group in busy]
            else:
                results = list(self._pool.map(step, busy))
            for group, result in zip(busy, results, strict=True):
                for i, row in enumerate(list(group.keys)):
                    if row not in stepping:  # cancelled meanwhile: leaves after this step
                        continue
                    try:
                        if isinstance(result, Exception):
                            raise result
                        self._emit(row, row.decoding.advance(result[i], None))
                    except Exception as e:
                        logger.exception("request %s failed in an engine step", row.job.request_id)
                        self._fail(row, e)

    def _ring_bytes(self) -> int:
        return sum(group.held_bytes() for group in list(self._groups))

    def _plain_rows(self, plain: list[_Row]) -> DecodeRows:
        """The batch holding exactly the ``plain`` rows: rows new to plain decoding join it
        with their state (the batch owns it from then on), others leave."""
        if self._batch is None:
            self._batch = DecodeRows(self.model, min(self.max_sessions, 4))
        batch = self._batch
        leaving = [r for r in batch.keys if r not in plain]
        joining = [r for r in plain if r not in batch]
        for row in leaving:
            batch.leave(row)
        for row in joining:
            batch.join(row, row.decoding.state)
            row.decoding.state = None
        if leaving or joining:  # the bytes change only with the rows
            self._batch_bytes = batch.nbytes()
        return batch

    def _emit(self, row: _Row, tokens: list[int]) -> None:
        output, ids, text = row.output, [], ""
        for token in tokens:
            ids.append(token)
            text += output.push(token)
            if output.reason is not None:
                text += output.finish()
                break
        if row.first_token is None:
            row.first_token = time.perf_counter()
        if text or ids:
            row.job.emit(Event("delta", text, ids))
        if output.reason is not None:
            self._finish(row, output.reason)

    def _fail(self, row: _Row, error: Exception) -> None:
        row.output.reason = "error"
        row.job.emit(Event("error", info={"status": 500, "message": f"decoding failed: {error}"}))

    def _finish(self, row: _Row, reason: str) -> None:
        job, decoding = row.job, row.decoding
        if reason in ("eos", "stop", "length"):
            # The conversation so far, for a follow-up turn that starts with it (kept before
            # the client hears that the request is done).
            batch = self._batch
            in_batch = batch is not None and row in batch
            state = batch.state(row) if in_batch else decoding.state
            group = self._group_of.get(row)
            if state is None and group is not None:
                # Decoded on the engine: its ring state back in PyTorch (~20 ms, and a fresh
                # state to fill; the cache copies what it keeps).
                state = group.row(row).to_state(self.model.init_state(1))
            if state is not None:
                self.cache.put(decoding.history, state)
        now = time.perf_counter()
        new = len(row.output.tokens)
        first = row.first_token or now
        info = {
            "finish_reason": reason,
            "prompt_tokens": len(job.prompt),
            "completion_tokens": new,
            "cached_tokens": row.cached,
            "queue_s": row.started - job.submitted,
            "prefill_s": row.prefill_s,
            "ttft_s": first - job.submitted,
            "decode_tokens_per_s": (new - 1) / (now - first) if new > 1 and now > first else 0.0,
            "mean_accepted": decoding.mean_accepted,
        }
        job.emit(Event("done", info=info))
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.completed += 1
        logger.info(
            "request %s: %s; prompt %d tokens (%d cached), %d new; queue %.3f s, prefill %.3f s, "
            "first token %.3f s, decode %.1f tokens/s",
            job.request_id,
            reason,
            info["prompt_tokens"],
            row.cached,
            new,
            info["queue_s"],
            row.prefill_s,
            info["ttft_s"],
            info["decode_tokens_per_s"],
        )

    def _leave(self) -> None:
        """Drop finished and cancelled rows: their states go with them."""
        leaving = [r for r in self._rows if r.output.reason is not None or r.job.cancelled.is_set()]
        for row in leaving:
            if row.output.reason is None:
                self._finish(row, "cancelled")
        batch = self._batch
        if batch is not None and leaving:
            for row in leaving:
                if row in batch:
                    batch.leave(row)
            self._batch_bytes = batch.nbytes()
        for row in leaving:
            group = self._group_of.pop(row, None)
            if group is not None:
                group.remove(row)
        with self._wakeup:
            self._rows = [r for r in self._rows if r not in leaving]
