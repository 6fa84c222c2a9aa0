"""Perplexity: the one protocol behind the trainer's held-out numbers, ``linearize eval ppl``, the
study and the reference numbers in docs (and design/assets.md). It lives in ``train/`` because
the trainer scores its held-out tokens with it and ``eval/`` sits above ``train/``.

A text is tokenized as one string without BOS. **Windowed** evaluation cuts the tokens into
windows of ``window`` tokens starting every ``stride`` tokens (by default ``stride = window``:
non-overlapping windows); each window is a fresh sequence (no state carried in) and scores its
tokens that no earlier window scored, never its first token. **Streaming** evaluation runs one
pass over the whole text, carrying the model's state from one segment of ``window`` tokens to the
next, and scores every token but the first: with a linear attention the memory stays constant, so
the perplexity at 32k+ tokens of context is measurable. ``PPL = exp(mean NLL)``, NLL in nats per
scored token.

Every form (parallel / chunk / recurrent) of the same model gives the same perplexity, to float
tolerance: the form only changes how each window is computed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.config import Config, option
from linearize.models.decoder import Decoder, ModelState

logger = logging.getLogger(__name__)

EvalForm = Literal["parallel", "chunk", "recurrent"]
EVAL_FORMS = ("parallel", "chunk", "recurrent")
# Rows of hidden states turned into logits at once: bounds the [rows, vocab] logits buffer.
LOGIT_ROWS = 1024

Progress = Callable[[int, int], None]


@dataclass
class PerplexityConfig(Config):
    """How to score a token sequence."""

    window: int = option("tokens per window (per segment when streaming)", 1024)
    stride: int | None = option("start a window every STRIDE tokens (default: window)", None)
    tokens: int | None = option("score only the first N tokens of the data", None)
    form: EvalForm = option("how each window is computed: parallel, chunk or recurrent", "chunk")
    stream: bool = option("one pass over the whole text, state carried between segments", False)

    def validate(self) -> PerplexityConfig:
        if self.window < 2:
            raise ValueError(f"window must be >= 2 tokens (one is context), got {self.window}")
        if self.stride is not None and not 1 <= self.stride <= self.window:
            raise ValueError(f"stride must be in [1, window={self.window}], got {self.stride}")
        if self.stream and self.stride not in (None, self.window):
            raise ValueError("--stride applies to windowed evaluation, not to --stream")
        if self.tokens is not None and self.tokens < 2:
            raise ValueError(f"tokens must be >= 2 (one is context), got {self.tokens}")
        if self.form not in EVAL_FORMS:
            raise ValueError(f"form={self.form!r}; allowed: {list(EVAL_FORMS)}")
        return self


@dataclass
class PerplexityResult:
    """``ppl = exp(nll)``; ``tokens`` scored; ``seconds`` of model time."""

    ppl: float
    nll: float
    tokens: int
    window: int
    form: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Span:
    """One window ``tokens[start:end]`` scoring the targets ``tokens[score_from:end]``."""

    start: int
    end: int
    score_from: int


# Receives one window's per-target NLLs: (its span, nlls [end - score_from], float64).
TargetsCallback = Callable[[Span, Tensor], None]


def in_window_positions(span: Span, count: int) -> Tensor:
    """The positions inside their window of ``span``'s first ``count`` targets: how many of the
    window's tokens precede each (a window's first scored target has 1, its last
    ``end − start − 1``)."""
    return torch.arange(span.score_from, span.score_from + count) - span.start


def window_spans(num_tokens: int, window: int, stride: int | None = None) -> list[Span]:
    """The windows of the protocol: every target in ``1..num_tokens-1`` is scored exactly once.

    Window ``i`` covers ``[i·stride, i·stride + window)`` (clipped to the text) and scores the
    tokens past the previous window's end (all but its first token for the first window); the
    last window is the first to reach the end of the text.
    """
    stride = window if stride is None else stride
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {num_tokens}")
    if window > num_tokens:
        raise ValueError(
            f"window of {window} tokens is larger than the text ({num_tokens} tokens); "
            "use a smaller --window"
        )
    spans, scored_to = [], 1
    for start in range(0, num_tokens, stride):
        end = min(start + window, num_tokens)
        if end - start >= 2 and end > scored_to:
            spans.append(Span(start, end, max(scored_to, start + 1)))
            scored_to = end
        if end == num_tokens:
            break
    return spans


def target_nlls(model: Decoder, hidden: Tensor, targets: Tensor) -> Tensor:
    """Per-target NLL ``[N]`` (float64, on the CPU) of ``targets: [N]`` given final hidden
    states ``[N, D]``.

    The logits are made ``LOGIT_ROWS`` rows at a time, so a long window never holds
    ``[window, vocab]`` logits at once.
    """
    out = []
    for s in range(0, targets.shape[0], LOGIT_ROWS):
        logits = model.lm_head(hidden[s : s + LOGIT_ROWS])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        out.append(F.cross_entropy(logits, targets[s : s + LOGIT_ROWS], reduction="none"))
    return torch.cat(out).double().cpu() if out else torch.zeros(0, dtype=torch.float64)


def token_nll(model: Decoder, hidden: Tensor, targets: Tensor) -> Tensor:
    """Summed NLL (float64 scalar) of ``targets: [N]`` given final hidden states ``[N, D]``."""
    return target_nlls(model, hidden, targets).sum()


def _run(
    model: Decoder, ids: Tensor, state: ModelState | None, form: str
) -> tuple[Tensor, ModelState]:
    hidden, state = model.forward_hidden(ids[None].to(model.device), state=state, form=form)
    return hidden[0], state


@torch.no_grad()
def windowed_nll(
    model: Decoder,
    tokens: Tensor,
    window: int,
    stride: int | None = None,
    form: str = "chunk",
    progress: Progress | None = None,
    *,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_targets: TargetsCallback | None = None,
) -> tuple[float, int]:
    """``(summed NLL, scored tokens)`` over the windows of :func:`window_spans`.

    ``shard = (rank, world_size)``: this process scores windows ``rank::world_size`` (the caller
    sums over processes); windows of one shape are run ``batch_size`` at a time.
    ``on_targets(span, nlls)`` receives each window's per-target NLLs (``tokens[score_from:
    end]``, float64), e.g. to group them by position (:func:`in_window_positions`)."""
    rank, world = shard
    spans = window_spans(len(tokens), window, stride)[rank::world]
    total, count, done = 0.0, 0, 0
    for group in _batches(spans, batch_size):
        ids = torch.stack([tokens[s.start : s.end] for s in group]).to(model.device)
        with autocast():
            hidden, _ = model.forward_hidden(ids, form=form)
        for row, span in zip(hidden, group, strict=True):
            # row[j] predicts tokens[start + j + 1]; score targets from score_from on.
            first = span.score_from - span.start - 1
            targets = tokens[span.score_from : span.end].to(model.device)
            nlls = target_nlls(model, row[first:-1], targets)
            if on_targets is not None:
                on_targets(span, nlls)
            total += float(nlls.sum())
            count += len(targets)
        done += len(group)
        if progress is not None:
            progress(done, len(spans))
    return total, count


def _batches(spans: list[Span], batch_size: int) -> Iterator[list[Span]]:
    """Consecutive runs of at most ``batch_size`` spans of one length."""
    group: list[Span] = []
    for span in spans:
        if group and (
            len(group) == batch_size or span.end - span.start != group[0].end - group[0].start
        ):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def streaming_nll(
    model: Decoder,
    tokens: Tensor,
    segment: int,
    form: str = "chunk",
    progress: Progress | None = None,
) -> tuple[float, int]:
    """``(summed NLL, scored tokens)`` of one pass over ``tokens`` with the state carried.

    Segment ``[s, e)`` is computed on top of the state after ``tokens[:s]``; its hidden state at
    ``j`` predicts ``tokens[s + j + 1]``, so every token but the first is scored exactly once.
    """
    N = len(tokens)
    if N < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {N}")
    state, total, count = None, 0.0, 0
    segments = range(0, N - 1, segment)
    for i, s in enumerate(segments):
        e = min(s + segment, N - 1)
        hidden, state = _run(model, tokens[s:e], state, form)
        targets = tokens[s + 1 : e + 1].to(model.device)
        total += float(token_nll(model, hidden, targets))
        count += len(targets)
        if progress is not None:
            progress(i + 1, len(segments))
    logger.debug("streamed %d tokens; final state %d bytes", N, state.nbytes())
    return total, count


@torch.no_grad()
def perplexity(
    model: Decoder,
    tokens: Tensor,
    config: PerplexityConfig | None = None,
    progress: Progress | None = None,
    on_targets: TargetsCallback | None = None,
) -> PerplexityResult:
    """The perplexity of ``model`` on ``tokens: [T]`` under ``config`` (see the module doc);
    windowed, ``on_targets`` receives each window's per-target NLLs (:func:`windowed_nll`)."""
    config = (config or PerplexityConfig()).validate()
    tokens = scored_tokens(tokens, config)
    _check_context(model, config, len(tokens))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        if config.stream:
            total, count = streaming_nll(model, tokens, config.window, config.form, progress)
        else:
            total, count = windowed_nll(
                model,
                tokens,
                config.window,
                config.stride,
                config.form,
                progress,
                on_targets=on_targets,
            )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return PerplexityResult(
        exp_mean(total, count), total / count, count, config.window, config.form, seconds
    )


def scored_tokens(tokens: Tensor, config: PerplexityConfig) -> Tensor:
    """``tokens: [T]`` cut to the ``config.tokens`` the protocol scores (errors for bad input)."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if config.tokens is None:
        return tokens
    if config.tokens > len(tokens):
        raise ValueError(f"--tokens {config.tokens} asked; the data has {len(tokens)} tokens")
    return tokens[: config.tokens]


def exp_mean(nll_sum: float, count: int) -> float:
    """Perplexity ``exp(mean NLL)``; inf when nothing was scored or the mean overflows."""
    if count == 0:
        return math.inf
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else math.inf


def _check_context(model: Decoder, config: PerplexityConfig, num_tokens: int) -> None:
    if not config.stream and config.window > num_tokens:
        raise ValueError(
            f"window of {config.window} tokens is larger than the text ({num_tokens} tokens); "
            "use a smaller --window"
        )
    context = num_tokens if config.stream else config.window
    limit = model.config.max_position_embeddings
    softmax_layers = [n for n in model.attention_names() if n == "softmax"]
    if softmax_layers and context > limit:
        logger.warning(
            "%d tokens of context exceed this model's max_position_embeddings=%d: its softmax "
            "layers run past their trained positions",
            context,
            limit,
        )
