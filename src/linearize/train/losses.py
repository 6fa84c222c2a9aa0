"""Training losses: next-token cross-entropy and attention transfer (held-out perplexity is
``perplexity.py``).

Losses are returned as **sums** (with the count they sum over where that varies), so the trainer
divides once by the global count of a step: the same update whatever the split of the global
batch into processes and micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
