"""Rotary position embeddings, computed for explicit positions (the state says where we are)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """LLaMA-style RoPE (``rotate_half`` layout), matching transformers' float32 arithmetic.

    cos/sin are tabulated once per position range (the table doubles when a position beyond it
    is asked for), so a decode step is a lookup, not a recomputation.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def _cos_sin(self, end: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        cos, sin = self._table.get((dtype, device), (None, None))
        if cos is None or cos.shape[0] < end:
            size = max(end, 2 * (0 if cos is None else cos.shape[0]), 256)
            positions = torch.arange(size, device=device, dtype=torch.float32)
            freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat([freqs, freqs], -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            self._table[(dtype, device)] = (cos, sin)
        return cos, sin

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x: [B, T, H, K]`` rotated by ``positions: [T]`` (or ``[B, T]``: a position per row)."""
        cos, sin = self._cos_sin(int(positions.max()) + 1, x.dtype, x.device)
        return self.rotate(x, cos[positions][..., None, :], sin[positions][..., None, :])

    def cos_sin(self, position: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``cos, sin: [K]`` at one position (what a fixed-shape step takes as inputs)."""
        cos, sin = self._cos_sin(position + 1, dtype, self.inv_freq.device)
        return cos[position], sin[position]

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x: [..., K]`` rotated by ``cos, sin`` broadcast against it."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin
