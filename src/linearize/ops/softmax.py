"""Causal softmax attention over a KV cache: the teacher and the control.

``q: [B, T, H, K]``, ``k: [B, T, Hkv, K]``, ``v: [B, T, Hkv, V]``, ``H`` a multiple of ``Hkv``.
The state is a KV cache; unlike every linear attention it grows with the context. Storage is
allocated with spare capacity (doubling), so appending a token costs O(1) amortised; a state
object only reads its first ``pos`` slots, so advancing a state never changes what an older state
object sees (advancing an *older* state again overwrites the slots of the newer one: that is the
rollback used by speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops.tree import Tree


@dataclass
class KVCache:
    """``k: [B, Hkv, capacity, K]``, ``v: [B, Hkv, capacity, V]``; the first ``pos`` are valid."""

    k: Tensor
    v: Tensor
    pos: int

    def nbytes(self) -> int:
        # What the cache would need if sized exactly: capacity slack is an allocation detail.
        used = self.k[:, :, : self.pos], self.v[:, :, : self.pos]
        return sum(t.numel() * t.element_size() for t in used)

    def kept(self) -> tuple[Tensor, Tensor]:
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]


def init_state(
    batch_size: int,
    num_kv_heads: int,
    key_dim: int,
    value_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    capacity: int = 256,
) -> KVCache:
    shape = (batch_size, num_kv_heads, capacity)
    return KVCache(
        k=torch.zeros(*shape, key_dim, dtype=dtype, device=device),
        v=torch.zeros(*shape, value_dim, dtype=dtype, device=device),
        pos=0,
    )


def advance(state: KVCache, k: Tensor, v: Tensor) -> KVCache:
    """The cache after appending ``k: [B, Hkv, T, K]``, ``v: [B, Hkv, T, V]``."""
    T = k.shape[2]
    end = state.pos + T
    ck, cv = state.k, state.v
    if end > ck.shape[2] or torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        # Grow (or, under autograd, build out of place so the graph stays valid).
        capacity = max(end, 2 * ck.shape[2]) if end > ck.shape[2] else ck.shape[2]
        nk = ck.new_zeros(*ck.shape[:2], capacity, ck.shape[3])
        nv = cv.new_zeros(*cv.shape[:2], capacity, cv.shape[3])
        nk = torch.cat([ck[:, :, : state.pos], k, nk[:, :, end:]], 2)
        nv = torch.cat([cv[:, :, : state.pos], v, nv[:, :, end:]], 2)
        return KVCache(nk, nv, end)
    ck[:, :, state.pos : end] = k
    cv[:, :, state.pos : end] = v
    return KVCache(ck, cv, end)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    # q: [B, H, Nq, K]; k, v: [B, Hkv, Nk, ·]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def parallel(q: Tensor, k: Tensor, v: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
    """All ``T`` queries at once on top of the cache (torch SDPA)."""
    T = q.shape[1]
    new = advance(state, k.transpose(1, 2), v.transpose(1, 2))
    keys, values = new.kept()
    if state.pos == 0:
        o = _sdpa(q.transpose(1, 2), keys, values, None, causal=T > 1)
    else:
        t_q = torch.arange(state.pos, new.pos, device=q.device)
        mask = torch.arange(new.pos, device=q.device)[None, :] <= t_q[:, None]
        o = _sdpa(q.transpose(1, 2), keys, values, mask, causal=False)
    return o.transpose(1, 2), new


chunk = parallel
recurrent = parallel


def tree(q: Tensor, k: Tensor, v: Tensor, state: KVCache, *, tree: Tree) -> tuple[Tensor, KVCache]:
    """Tree nodes see the whole cache plus their ancestors (``ancestors: [N, N]`` bool)."""
    N = q.shape[1]
    keys, values = state.kept()
    keys = torch.cat([keys, k.transpose(1, 2)], 2)
    values = torch.cat([values, v.transpose(1, 2)], 2)
    committed = torch.ones(N, state.pos, dtype=torch.bool, device=q.device)
    mask = torch.cat([committed, tree.ancestors.to(q.device)], 1)
    o = _sdpa(q.transpose(1, 2), keys, values, mask, causal=False)
    return o.transpose(1, 2), state


def naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The definition from the start of the sequence: ``softmax(q kᵀ/√K + causal mask) v``."""
    T, R = q.shape[1], q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(R, 2), v.repeat_interleave(R, 2)
    scores = torch.einsum("bqhk,bnhk->bhqn", q, kr) / q.shape[-1] ** 0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return torch.einsum("bhqn,bnhv->bqhv", weights, vr)
