"""Feature maps φ of the linear attentions: ``φ(x): [B, T, Hx, K] → [B, T, Hx, F]``.

Parameters (where a map has any) are per key/value head; a query head uses the map of the
key/value head it reads, so ``φ(q)·φ(k)`` is a kernel of matching maps under grouped-query
attention. Fixed random projections (performer, yoso) are seeded buffers saved with the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.layers.meta import building_on_meta


class FeatureMap(nn.Module):
    """Base class: ``feature_dim`` is F; ``forward`` accepts key heads or query heads."""

    feature_dim: int

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def per_head(self, weight: Tensor, num_heads: int) -> Tensor:
        """``weight: [Hkv, ...]`` repeated for ``num_heads`` query heads."""
        return weight.repeat_interleave(num_heads // self.num_kv_heads, 0)

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x: [B, T, H, K]`` times each head's ``weight: [Hkv, K, F]`` → ``[B, T, H, F]``.
        A batched matmul over heads (an exported graph runs it as one ``MatMul``; onnxruntime's
        ``Einsum`` is several times slower on one token)."""
        heads = self.per_head(weight, x.shape[2])
        return torch.matmul(x.transpose(1, 2), heads).transpose(1, 2)

    def grouped(self, x: Tensor) -> Tensor:
        """``x: [B, Hkv, n, K]``, ``n`` heads per key/value head (the head order ``per_head``
        assumes: a query group, or a query group and its key) → ``[B, Hkv, n, F]``, the same
        numbers as ``forward`` on those heads. Maps with per-head weights override it with one
        matmul on the ``Hkv`` weights (a decode step's fast path)."""
        B, Hkv, n, K = x.shape
        return self(x.reshape(B, 1, Hkv * n, K)).view(B, Hkv, n, -1)


class Unit(FeatureMap):
    """``x / ‖x‖``: FLASH's global part (identity map on normalised q and k)."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__(num_kv_heads, head_dim)
        self.feature_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Relu(FeatureMap):
    """``relu(x)`` (EfficientViT)."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__(num_kv_heads, head_dim)
        self.feature_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class Elu(FeatureMap):
    """``1 + elu(x)`` (Katharopoulos et al. 2020)."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__(num_kv_heads, head_dim)
        self.feature_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return 1 + F.elu(x)


def _orthogonal_gaussian(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``[rows, cols]`` with orthogonal blocks of columns and chi-distributed norms (FAVOR+)."""
    blocks = []
    for _ in range(math.ceil(cols / rows)):
        g = torch.randn(rows, rows, generator=generator, dtype=torch.float64)
        blocks.append(torch.linalg.qr(g)[0])
    omega = torch.cat(blocks, 1)[:, :cols]
    norms = torch.randn(rows, cols, generator=generator, dtype=torch.float64).norm(dim=0)
    return (omega * norms).float()


class Performer(FeatureMap):
    """FAVOR+ positive random features ``exp(ωᵀx − ‖x‖²/2) / √m``, ``x`` scaled by ``K^-1/4``."""

    def __init__(
        self, num_kv_heads: int, head_dim: int, feature_dim: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(num_kv_heads, head_dim)
        self.feature_dim = feature_dim or head_dim
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", _orthogonal_gaussian(head_dim, self.feature_dim, generator))

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.head_dim**-0.25
        projection = x @ self.omega.to(x.dtype)
        return torch.exp(projection - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(
            self.feature_dim
        )


def _identities(heads: int, rows: int, cols: int) -> Tensor:
    """``heads`` copies of ``eye(rows, cols)`` (left empty on the meta device: the loader fills
    it, :func:`~linearize.layers.meta.building_on_meta`)."""
    if building_on_meta():
        return torch.empty(heads, rows, cols)
    return torch.eye(rows, cols).repeat(heads, 1, 1)


class Hedgehog(FeatureMap):
    """Learned ``[softmax(Wx), softmax(−Wx)]`` (Zhang et al. 2024); ``W`` starts as identity."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__(num_kv_heads, head_dim)
        half = (feature_dim or 2 * head_dim) // 2
        self.feature_dim = 2 * half
        self.weight = nn.Parameter(_identities(num_kv_heads, head_dim, half))  # [Hkv, K, F/2]

    def forward(self, x: Tensor) -> Tensor:
        return self._features(self.project(x, self.weight))

    def grouped(self, x: Tensor) -> Tensor:
        return self._features(torch.matmul(x, self.weight))

    @staticmethod
    def _features(proj: Tensor) -> Tensor:
        return torch.cat([torch.softmax(proj, -1), torch.softmax(-proj, -1)], -1)


class T2R(FeatureMap):
    """Learned ``relu(Wx + b)`` (Kasai et al. 2021); identity and zero at initialisation."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__(num_kv_heads, head_dim)
        self.feature_dim = feature_dim or head_dim
        self.weight = nn.Parameter(_identities(num_kv_heads, head_dim, self.feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, self.feature_dim))

    def forward(self, x: Tensor) -> Tensor:
        H = x.shape[2]
        proj = self.project(x, self.weight)
        return F.relu(proj + self.per_head(self.bias, H))

    def grouped(self, x: Tensor) -> Tensor:
        return F.relu(torch.matmul(x, self.weight) + self.bias[:, None])


class Yoso(FeatureMap):
    """Hashed YOSO: ``m`` sign-hashes of ``τ`` bits, ``φ`` = one-hot codes averaged over hashes.

    ``φ(q)·φ(k)`` estimates the collision probability ``(1 − arccos(q̂·k̂)/π)^τ``. The map is
    piecewise constant, so no gradient flows through q and k (values still train).
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        num_hashes: int = 16,
        num_bits: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(num_kv_heads, head_dim)
        self.num_hashes, self.num_bits = num_hashes, num_bits
        self.feature_dim = num_hashes * 2**num_bits
        shape = (head_dim, num_hashes * num_bits)
        if building_on_meta():  # (the loader fills the planes; reset_buffers, the powers)
            planes, powers = torch.empty(shape), torch.empty(num_bits, dtype=torch.int64)
        else:
            planes = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            powers = 2 ** torch.arange(num_bits)
        self.register_buffer("planes", planes)
        self.register_buffer("powers", powers, persistent=False)

    def reset_buffers(self) -> None:
        """Compute the buffer the weights file does not hold (see RotaryEmbedding's)."""
        self.powers = 2 ** torch.arange(self.num_bits, device=self.powers.device)

    def forward(self, x: Tensor) -> Tensor:
        bits = (x @ self.planes.to(x.dtype) > 0).long()
        bits = bits.unflatten(-1, (self.num_hashes, self.num_bits))
        codes = (bits * self.powers).sum(-1)  # [B, T, H, m]
        onehot = F.one_hot(codes, 2**self.num_bits).to(x.dtype)
        return onehot.flatten(-2) / math.sqrt(self.num_hashes)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "unit": Unit,
    "relu": Relu,
    "elu": Elu,
    "performer": Performer,
    "hedgehog": Hedgehog,
    "t2r": T2R,
    "yoso": Yoso,
}


def build_feature_map(
    name: str, num_kv_heads: int, head_dim: int, feature_dim: int | None = None
) -> FeatureMap:
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; valid: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_kv_heads, head_dim, feature_dim)
