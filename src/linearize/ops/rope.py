"""Rotary position embeddings as plain functions (``rotate_half`` layout, transformers' float32
arithmetic): the layer's :class:`~linearize.layers.rope.RotaryEmbedding` and the ops that move a
key to another position (the retained cache) share them."""

from __future__ import annotations

import torch
from torch import Tensor


def cos_sin(
    positions: Tensor, inv_freq: Tensor, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``cos, sin: [..., K]`` at ``positions`` (any shape): the positions in float32 times the
    inverse frequencies ``inv_freq: [K/2]``."""
    positions = positions.to(device=inv_freq.device, dtype=torch.float32)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x: [..., K]`` rotated by ``cos, sin`` broadcast against it (``-sin``: rotated back)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin
