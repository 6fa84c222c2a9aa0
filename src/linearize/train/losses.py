"""Training losses (next-token cross-entropy, attention transfer) and held-out perplexity.

Losses are returned as **sums** (with the count they sum over where that varies), so the trainer
divides once by the global count of a step: the same update whatever the split of the global
batch into processes and micro-batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.models.decoder import Decoder


def _wide(x: Tensor) -> Tensor:
    """``x`` in at least float32 (bf16 activations are summed in float32; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def next_token_nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Summed NLL (nats) of ``input_ids[:, 1:]`` under ``logits[:, :-1]``: ``[B, T, V]``,
    ``[B, T]`` → scalar, in at least float32 (``B * (T - 1)`` predictions)."""
    predicted = _wide(logits[:, :-1]).flatten(0, 1)
    return F.cross_entropy(predicted, input_ids[:, 1:].flatten(), reduction="sum")


def attention_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Summed squared error between a linearized layer's output and the softmax layer's
    output ``[B, T, D]``, in at least float32."""
    return (_wide(student) - _wide(teacher)).pow(2).sum()


def windows(tokens: Tensor, window: int) -> Tensor:
    """Non-overlapping ``window``-token windows ``[N, window]`` of ``tokens: [T]`` (tail
    dropped), or one window of all the tokens when there are fewer than ``window``."""
    if tokens.dim() != 1 or len(tokens) < 2:
        raise ValueError(f"evaluation tokens must be 1-D with >= 2 tokens, got {tokens.shape}")
    window = min(window, len(tokens))
    n = len(tokens) // window
    return tokens[: n * window].view(n, window)


@torch.no_grad()
def windowed_nll(
    model: Decoder,
    tokens: Tensor,
    window: int,
    *,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 1,
    form: str = "auto",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, int]:
    """Summed NLL and number of scored tokens over non-overlapping windows of ``tokens``; each
    window is a fresh sequence and scores every token but its first (PPL = exp(sum / count)).

    ``shard = (rank, world_size)``: this process scores windows ``rank::world_size`` (the
    caller sums over processes)."""
    rank, world = shard
    blocks = windows(tokens, window)[rank::world].to(model.device)
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        with autocast():
            logits, _ = model(batch, form=form)
        total += float(next_token_nll(logits, batch))
        count += batch.numel() - batch.shape[0]
    return total, count


def perplexity(nll_sum: float, count: int) -> float:
    """``exp(mean NLL)``; inf when nothing was scored or the mean overflows."""
    if count == 0:
        return math.inf
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else math.inf
