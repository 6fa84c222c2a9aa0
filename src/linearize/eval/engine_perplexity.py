"""Perplexity through a fast decoding engine: the number its users get.

The windows (or the one stream) are those of :func:`linearize.train.perplexity.perplexity`; each
window starts from an empty engine state and runs its tokens through the engine in chains of up
to ``engine.max_tree`` tokens (the tree graph on a chain: the logits of every position, the
state committed after each chain). So the score includes everything the engine changes: its
quantized weights and its arithmetic (``accuracy``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops.tree import Tree
from linearize.train.perplexity import (
    PerplexityConfig,
    PerplexityResult,
    Progress,
    Span,
    exp_mean,
    scored_tokens,
    window_spans,
)


def _span_nll(engine, tokens: Tensor, span: Span) -> tuple[float, int]:
    """Summed NLL and count of the targets ``tokens[score_from:end]``, from an empty state."""
    engine.reset()
    ids = tokens[span.start : span.end - 1].tolist()
    rows = []
    for s in range(0, len(ids), engine.max_tree):
        piece = ids[s : s + engine.max_tree]
        chain = Tree.from_parents([-1, *range(len(piece) - 1)])
        logits, _ = engine.forward_tree(piece, chain)
        rows.append(logits.clone())
        engine.commit(list(range(len(piece))))
    logits = torch.cat(rows)[span.score_from - span.start - 1 :].double()
    targets = tokens[span.score_from : span.end]
    return float(F.cross_entropy(logits, targets, reduction="sum")), len(targets)


@torch.no_grad()
def engine_perplexity(
    engine,
    tokens: Tensor,
    config: PerplexityConfig | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """The perplexity of the model inside ``engine`` (an :class:`~linearize.engine.onnx.
    OnnxEngine`) on ``tokens: [T]``; ``config.form`` does not apply (the result's form is
    ``"engine"``)."""
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
        nll, n = _span_nll(engine, tokens, span)
        total, count = total + nll, count + n
        if progress is not None:
            progress(i + 1, len(spans))
    seconds = time.perf_counter() - start
    return PerplexityResult(
        exp_mean(total, count), total / count, count, config.window, "engine", seconds
    )
