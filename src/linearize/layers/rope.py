"""Rotary position embeddings, computed for explicit positions (the state says where we are)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from linearize.layers.meta import building_on_meta
from linearize.ops import rope


class RotaryEmbedding(nn.Module):
    """LLaMA-style RoPE (``rotate_half`` layout), matching transformers' float32 arithmetic.

    cos/sin are computed for the positions asked for, not read from a table: a table covering
    every position so far would grow with the context (33 MB per layer at 64k positions for
    SmolLM2), and decoding must not.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # (On the meta device left empty: reset_buffers computes it once there is memory.)
        inv_freq = torch.empty(head_dim // 2) if building_on_meta() else self._inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self) -> Tensor:
        K = self.head_dim
        return 1.0 / self.theta ** (torch.arange(0, K, 2, dtype=torch.int64).float() / K)

    def reset_buffers(self) -> None:
        """Compute the buffer the weights file does not hold (a model built on the meta device
        and then given memory: ``linearize.models.convert._materialized``)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def cos_sin_at(
        self, positions: Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """``cos, sin: [..., K]`` at ``positions`` (any shape): the positions in float32 times
        the inverse frequencies, as transformers computes them."""
        return rope.cos_sin(positions, self.inv_freq, dtype)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x: [B, T, H, K]`` rotated by ``positions: [T]`` (or ``[B, T]``: a position per row)."""
        cos, sin = self.cos_sin_at(positions, x.dtype)
        return self.rotate(x, cos[..., None, :], sin[..., None, :])

    def cos_sin(self, position: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``cos, sin: [K]`` at one position (what a fixed-shape step takes as inputs)."""
        return self.cos_sin_at(torch.tensor(position), dtype)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x: [..., K]`` rotated by ``cos, sin`` broadcast against it."""
        return rope.rotate(x, cos, sin)
