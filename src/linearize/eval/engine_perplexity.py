"""Perplexity through a fast decoding engine: the number its users get.

The windows (or the one stream) are those of :func:`linearize.train.perplexity.perplexity`; each
window starts from an empty engine state and runs its tokens through the engine in chains of up
to ``engine.max_tree`` tokens (the tree graph on a chain: the logits of every position, the
state committed after each chain). So the score includes everything the engine changes: its
quantized weights and its arithmetic (``accuracy``). :func:`engine_stream_perplexity` is
:func:`linearize.eval.long_context.stream_perplexity` (perplexity by position) through the engine.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.eval.long_context import (
    DEFAULT_BUCKETS,
    StreamResult,
    bucket_perplexity,
    check_buckets,
    check_length,
    scored_as,
    softmax_windows,
)
from linearize.ops.tree import Tree
from linearize.train.perplexity import (
    PerplexityConfig,
    PerplexityResult,
    Progress,
    Span,
    TargetsCallback,
    exp_mean,
    scored_tokens,
    window_spans,
)


def _span_nlls(engine, tokens: Tensor, span: Span, progress: Progress | None = None) -> Tensor:
    """Per-target NLLs (float64) of ``tokens[score_from:end]``, from an empty state;
    ``progress(read, total)`` after each chain. Each chain's logits are scored as they come
    (a whole novel's logits would not fit in memory)."""
    engine.reset()
    ids = tokens[span.start : span.end - 1].tolist()
    skip = span.score_from - span.start - 1  # rows before the first scored target
    nlls = []
    for s in range(0, len(ids), engine.max_tree):
        piece = ids[s : s + engine.max_tree]
        chain = Tree.from_parents([-1, *range(len(piece) - 1)])
        logits, _ = engine.forward_tree(piece, chain)
        # Row j predicts tokens[span.start + s + j + 1].
        first = max(skip - s, 0)
        if first < len(piece):
            at = span.start + s + 1
            targets = tokens[at + first : at + len(piece)]
            nlls.append(F.cross_entropy(logits[first:].double(), targets, reduction="none"))
        engine.commit(list(range(len(piece))))
        if progress is not None:
            progress(s + len(piece), len(ids))
    return torch.cat(nlls)


@torch.no_grad()
def engine_perplexity(
    engine,
    tokens: Tensor,
    config: PerplexityConfig | None = None,
    progress: Progress | None = None,
    on_targets: TargetsCallback | None = None,
) -> PerplexityResult:
    """The perplexity of the model inside ``engine`` (an :class:`~linearize.engine.onnx.
    OnnxEngine`) on ``tokens: [T]``; ``config.form`` does not apply (the result's form is
    ``"engine"``); ``on_targets(span, nlls)`` receives each window's per-target NLLs."""
    config = (config or PerplexityConfig()).validate()
    tokens = scored_tokens(tokens, config)
    N = len(tokens)
    if config.stream:
        if N < 2:
            raise ValueError(f"need at least 2 tokens to score one, got {N}")
        spans = [Span(0, N, 1)]
    else:
        spans = window_spans(N, config.window, config.stride)
    start = time.perf_counter()
    total, count = 0.0, 0
    for i, span in enumerate(spans):
        nlls = _span_nlls(engine, tokens, span)
        if on_targets is not None:
            on_targets(span, nlls)
        total, count = total + float(nlls.sum()), count + len(nlls)
        if progress is not None:
            progress(i + 1, len(spans))
    seconds = time.perf_counter() - start
    return PerplexityResult(
        exp_mean(total, count), total / count, count, config.window, "engine", seconds
    )


@torch.no_grad()
def engine_stream_perplexity(
    engine,
    tokens: Tensor,
    edges: tuple[int, ...] = DEFAULT_BUCKETS,
    progress: Progress | None = None,
) -> StreamResult:
    """Perplexity by position of ``tokens: [T]`` through ``engine``: a linear model streams the
    whole text on one carried state, a model with softmax layers is scored in windows of its
    ``max_position_embeddings`` (as :func:`~linearize.eval.long_context.stream_perplexity`);
    ``progress(tokens read, T − 1)``. The result's ``segment`` is the engine's chain length."""
    edges = check_buckets(edges)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    T = len(tokens)
    check_length(T, edges)
    spans = softmax_windows(engine.model, T)
    if spans is not None and spans[0].end > engine.max_context:
        raise ValueError(
            f"a softmax model is scored in windows of {spans[0].end} tokens; this engine's "
            f"max_context is {engine.max_context}"
        )
    targets, nlls = [], []
    for span in spans or [Span(0, T, 1)]:

        def read(done: int, total: int, start: int = span.start) -> None:
            if progress is not None:
                progress(start + done, T - 1)

        nlls.append(_span_nlls(engine, tokens, span, read))
        targets.append(torch.arange(span.score_from, span.end))
    position, nll = torch.cat(targets), torch.cat(nlls)
    mean = float(nll.mean())
    buckets = bucket_perplexity(position, nll, edges)
    how = scored_as(engine.model)
    return StreamResult(math.exp(mean), mean, len(nll), engine.max_tree, how, buckets)
