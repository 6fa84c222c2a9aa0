"""Causal linear attention with an optional exact local window: every linear attention we ship.

One op covers the whole family. A query at time τ splits its past into

- a **local** set (tokens of its own group ``⌊σ/G⌋ = ⌊τ/G⌋``, or of a sliding window
  ``τ − W < σ``, plus ``sinks`` first tokens), attended exactly with a kernel
  (``softmax`` inside the window, the paper's ``relu2`` = relu(q̂·k̂)², or ``none``), and
- a **global** set (everything else in its past), attended linearly through feature maps:
  ``fq_τ · Σ fk_σ v_σᵀ``, optionally divided by ``fq_τ · Σ fk_σ``.

``o = local + alpha · global`` (``combine="sum"``, the paper's layer), or, with
``combine="shared"``, one denominator for both parts (LoLCATs' window + linear layer)::

    o = (Σ_local e^{s−m} v + α Σ_global w v) / (Σ_local e^{s−m} + α Σ_global w)

with ``s = q·k/√K``, ``m`` the largest local score and ``w = fq·fk · decay^(τ−σ)``: a convex
combination of values, bounded at any length. ``decay < 1`` weighs a global token ``σ`` by
``decay^(τ−σ)``, so the global mass stays bounded too. ``q_sink`` (optional, every form) are the
queries used against sink keys: rotated at the position the query has inside the kept cache
(StreamingLLM), so sinks stay at a trained distance however long the sequence.

A plain linear attention (elu, relu, performer, ...) is the configuration
``window="sliding", size=0, local="none"``: nothing is local, everything is global.
FLASH is ``window="group"``; the paper's augmented layer adds a convolution on top (causal_conv).

Inputs: ``q: [B, T, H, K]``, ``k: [B, T, Hkv, K]`` (raw, for the local kernel),
``fq: [B, T, H, F]``, ``fk: [B, T, Hkv, F]`` (features, for the global part),
``v: [B, T, Hkv, V]``; ``H`` a multiple of ``Hkv`` (grouped-query attention: query head ``h``
reads key/value head ``h // (H // Hkv)``). Output ``o: [B, T, H, V]``.

The state keeps the tokens that some future query may still see locally (a fixed-capacity buffer)
and folds every other token into ``S = Σ fk vᵀ`` and ``z = Σ fk``: its size never depends on how
many tokens were seen. All forms return ``(o, final_state)`` and never change what their input
state holds: the decoding step writes a token into the buffer's next free slot in place, past the
``n`` slots the input state reads (as a KV cache appends; see :class:`LinearAttnState`).
Derivations: docs/forms.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops import retain
from linearize.ops.buffers import lazy_padded, lazy_zeros
from linearize.ops.tree import Tree

LocalKind = Literal["none", "softmax", "relu2"]
WindowKind = Literal["group", "sliding"]
CombineKind = Literal["sum", "shared"]


@dataclass(frozen=True)
class LinearAttnSpec:
    """What a query sees locally and how the rest is summarised."""

    local: LocalKind = "none"
    window: WindowKind = "sliding"
    size: int = 0
    sinks: int = 0
    use_global: bool = True
    normalize: bool = True
    combine: CombineKind = "sum"
    decay: float = 1.0
    retain: int = 0
    retain_halflife: float = 0.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.local not in ("none", "softmax", "relu2"):
            raise ValueError(f"local={self.local!r}; allowed: 'none', 'softmax', 'relu2'")
        if self.window not in ("group", "sliding"):
            raise ValueError(f"window={self.window!r}; allowed: 'group', 'sliding'")
        if self.window == "group" and self.size < 1:
            raise ValueError(f"group size must be >= 1, got {self.size}")
        if self.size < 0 or self.sinks < 0:
            raise ValueError(f"window size and sinks must be >= 0, got {self.size}, {self.sinks}")
        if self.local != "none" and self.window == "sliding" and self.size < 1:
            raise ValueError(f"a local kernel needs a window: size >= 1, got {self.size}")
        if self.combine not in ("sum", "shared"):
            raise ValueError(f"combine={self.combine!r}; allowed: 'sum', 'shared'")
        if self.combine == "shared" and self.local != "softmax":
            raise ValueError(f"combine='shared' needs local='softmax', got local={self.local!r}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.retain < 0:
            raise ValueError(f"retain (tokens kept past the window) must be >= 0: {self.retain}")
        if self.retain_halflife < 0:
            raise ValueError(f"retain_halflife must be >= 0 (0: no ageing): {self.retain_halflife}")
        if self.retain and (self.local != "softmax" or self.size < 1):
            raise ValueError(
                f"retain={self.retain} needs a softmax window (local='softmax', size >= 1), got "
                f"local={self.local!r}, size={self.size}"
            )

    @property
    def capacity(self) -> int:
        """Most tokens the state ever keeps exactly (the rest is folded into S)."""
        return self.sinks + max(self.size - 1, 0)

    def is_local(self, t_k: Tensor, t_q: Tensor) -> Tensor:
        """``[Nq, Nk]``: key time σ lies in query time τ's local set (σ ≤ τ assumed elsewhere).
        Integer tensors or numpy arrays (the engine's host side asks with numpy)."""
        s, t = t_k[None, :], t_q[:, None]
        # ``//`` floors for both.
        near = s // self.size == t // self.size if self.window == "group" else s > t - self.size
        return near | (s < self.sinks)


# The state's fields of the retained cache (``None`` without one), in this order.
RETAINED = ("score", "rk", "rv", "rtimes", "rscore")


@dataclass
class LinearAttnState:
    """Fixed-size decoding state: ``S [B,Hkv,F,V]``, ``z [B,Hkv,F]`` and a buffer of ``n`` kept
    tokens (keys ``[B,Hkv,C,K]``, features ``[B,Hkv,C,F]``, values ``[B,Hkv,C,V]``, times ``[C]``)
    out of a capacity ``C``; ``pos`` tokens seen so far.

    A state reads only its first ``n`` buffer slots. While the buffer has room, ``step`` writes
    the next token into slot ``n`` of the same tensors (no copy of the window per token), so
    advancing a state never changes what it holds, but advancing the *same* state twice makes
    the second step overwrite the slot of the first one's result: to continue one state two ways,
    continue a copy (``models.state.copy_state``), as with a KV cache.

    With ``spec.retain = M`` (:mod:`~linearize.ops.retain`) the state also holds each buffered
    token's in-window attention so far, ``score [B,Hkv,C]``, and the retained cache: keys ``rk
    [B,Hkv,M,K]``, values ``rv``, times ``rtimes [B,Hkv,M]`` and scores ``rscore``; ``None``
    otherwise."""

    S: Tensor
    z: Tensor
    k: Tensor
    fk: Tensor
    v: Tensor
    times: Tensor
    n: int
    pos: int
    score: Tensor | None = None
    rk: Tensor | None = None
    rv: Tensor | None = None
    rtimes: Tensor | None = None
    rscore: Tensor | None = None

    def nbytes(self) -> int:
        tensors = (self.S, self.z, self.k, self.fk, self.v, self.times, *self.retained())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def retained(self) -> tuple[Tensor | None, ...]:
        """``score`` and the retained cache ``rk, rv, rtimes, rscore`` (``None`` without)."""
        return tuple(getattr(self, name) for name in RETAINED)

    def kept(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The buffered tokens, in time order: keys, features, values ``[B,Hkv,n,·]``, times."""
        n = self.n
        return self.k[:, :, :n], self.fk[:, :, :n], self.v[:, :, :n], self.times[:n]


def init_state(
    spec: LinearAttnSpec,
    batch_size: int,
    num_kv_heads: int,
    key_dim: int,
    feature_dim: int,
    value_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LinearAttnState:
    B, Hkv, C = batch_size, num_kv_heads, spec.capacity
    zeros = dict(dtype=dtype, device=device)
    retained = retained_buffers(spec, B, Hkv, C, key_dim, value_dim, dtype=dtype, device=device)
    return LinearAttnState(
        S=torch.zeros(B, Hkv, feature_dim, value_dim, **zeros),
        z=torch.zeros(B, Hkv, feature_dim, **zeros),
        k=lazy_zeros(B, Hkv, C, key_dim, **zeros),
        fk=lazy_zeros(B, Hkv, C, feature_dim, **zeros),
        v=lazy_zeros(B, Hkv, C, value_dim, **zeros),
        times=torch.full((C,), -1, dtype=torch.long, device=device),
        n=0,
        pos=0,
        **retained,
    )


def retained_buffers(
    spec: LinearAttnSpec,
    batch: int,
    num_kv_heads: int,
    slots: int,
    key_dim: int,
    value_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """The empty retained cache of ``batch`` rows (``{}`` without ``spec.retain``), by
    :data:`RETAINED` name: ``score`` for ``slots`` window slots, ``M`` empty entries."""
    B, Hkv, M = batch, num_kv_heads, spec.retain
    if not M:
        return {}
    zeros = dict(dtype=dtype, device=device)
    return dict(
        score=torch.zeros(B, Hkv, slots, **zeros),
        rk=torch.zeros(B, Hkv, M, key_dim, **zeros),
        rv=torch.zeros(B, Hkv, M, value_dim, **zeros),
        rtimes=torch.full((B, Hkv, M), -1, dtype=torch.long, device=device),
        rscore=torch.full((B, Hkv, M), float("-inf"), **zeros),
    )


# --- the shared core ------------------------------------------------------------------------


def _heads_first(x: Tensor) -> Tensor:
    return x.transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D]


def _group_queries(x: Tensor, num_kv_heads: int) -> Tensor:
    B, T, H, D = x.shape
    return x.transpose(1, 2).reshape(B, num_kv_heads, H // num_kv_heads, T, D)  # [B,Hkv,R,T,D]


# The eager forms prune (``attend``) from this many keys on: below, the few extra small ops cost
# more than the columns they save (tiny models; a real model's chunk reads a window of 260+).
PRUNE_FROM = 256


def attend(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    t_q: Tensor,
    t_k: Tensor,
    visible: Tensor,
    S: Tensor,
    z: Tensor,
    alpha: Tensor | float = 1.0,
    *,
    s_time: int = 0,
    q_sink: Tensor | None = None,
    prune: bool = False,
    retaining: Retaining | None = None,
    sinks_at_ends: bool = False,
    global_cols: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attend queries to an explicit key list plus the folded summary ``S, z``.

    ``q: [B,Hkv,R,Nq,K]``, ``fq: [B,Hkv,R,Nq,F]``, ``k: [B,Hkv,Nk,K]``, ``fk: [B,Hkv,Nk,F]``,
    ``v: [B,Hkv,Nk,V]``, times ``t_q: [Nq]``, ``t_k: [Nk]``, ``visible: [Nq, Nk]`` (which keys
    are in each query's past); ``S, z`` hold the folded tokens decayed to time ``s_time``;
    ``q_sink`` (like ``q``) scores the sink keys. Returns ``[B,Hkv,R,Nq,V]``.

    ``prune`` scores the sink keys and the explicit global part only on the key columns they
    use: a chunk attends to a long window buffer, of which the sinks are a few columns and the
    tokens that leave the window within the chunk a few more. The same numbers, with shapes that
    depend on the times (eager forms; a traced graph keeps ``prune=False``).

    A traced graph prunes with shapes fixed by its inputs: ``sinks_at_ends`` says the sink keys
    can only be the first ``spec.sinks`` columns (a ring's sink slots) or the last ``Nq`` (the
    queries' own keys), and ``global_cols`` (padded with −1) holds every column some query reaches
    through the global part (the engine's tree graphs: the columns that leave the window).

    ``retaining`` (with ``spec.retain``) adds the retained cache to the window's softmax; the
    second output is then, for consecutive queries, each key column's in-window attention so far
    (``[B,Hkv,Nk]``, for the state), for tree nodes each node's own in-window attention on each
    key column (``[B,Hkv,Nq,Nk]``, summed over its query heads; for a commit), else ``None``.
    """
    local_mask = visible & spec.is_local(t_k, t_q)
    out = num = den = window = None
    if spec.local == "softmax":
        # The 1/√K scale on the queries, not on the [.., Nq, Nk] scores: a pass fewer over them,
        # the same numbers where √K is a power of two (K = 64).
        scale = 1 / math.sqrt(q.shape[-1])
        scaled, sink_scaled = q * scale, None if q_sink is None else q_sink * scale
        scores = _dot(scaled, k)
        if q_sink is not None and spec.sinks:
            is_sink = t_k < spec.sinks
            if prune:  # only the sink columns
                cols = is_sink.nonzero()[:, 0]
                scores = scores.index_copy(-1, cols, _dot(sink_scaled, k[:, :, cols]))
            elif sinks_at_ends:
                n, s = k.shape[2], spec.sinks
                first, last = slice(0, s), slice(n - q.shape[3], n)
                scores = torch.cat(
                    [
                        _sink_scores(sink_scaled, k, scores, is_sink, first),
                        scores[..., s : last.start],
                        _sink_scores(sink_scaled, k, scores, is_sink, last),
                    ],
                    -1,
                )
            else:
                scores = torch.where(is_sink, _dot(sink_scaled, k), scores)
        scores = scores.masked_fill(~local_mask, float("-inf"))
        if retaining is not None:
            num, den, window = _retained_readout(
                spec, scaled, k, v, t_q, t_k, visible, scores, retaining, sink_scaled
            )
            if spec.combine != "shared":
                out, num = num / den[..., None], None
        elif spec.combine == "shared":
            p, den = _softmax_and_sum(scores)
            num, den = _mix(p, v) * den, den[..., 0]
        else:
            out = _mix(torch.softmax(scores, dim=-1), v)
    elif spec.local == "relu2":
        qn, kn = _unit(q), _unit(k)
        weights = torch.relu(_dot(qn, kn)) ** 2
        out = _mix(weights * local_mask, v)
    if spec.use_global:
        global_mask = visible & ~local_mask
        g_fk, g_v, g_t = fk, v, t_k
        if prune:  # only the keys some query reaches through the global part
            cols = global_mask.any(0).nonzero()[:, 0]
            g_fk, g_v, g_t, global_mask = (
                fk[:, :, cols],
                v[:, :, cols],
                t_k[cols],
                global_mask[:, cols],
            )
        elif global_cols is not None:
            cols = global_cols.clamp_min(0)
            g_fk, g_v, g_t, global_mask = (
                fk[:, :, cols],
                v[:, :, cols],
                t_k[cols],
                global_mask[:, cols] & (global_cols >= 0),
            )
        weights = _dot(fq, g_fk) * global_mask
        folded = fq
        if spec.decay < 1:
            weights = weights * _decay(spec, t_q[:, None] - g_t[None, :], fq.dtype)
            folded = fq * _decay(spec, t_q - s_time, fq.dtype)[:, None]
        g_num = _mix(weights, g_v) + _mix(folded, S)
        if spec.normalize or spec.combine == "shared":
            g_den = weights.sum(-1) + torch.einsum("bhrqf,bhf->bhrq", folded, z)
        if spec.combine == "shared":
            return (num + alpha * g_num) / (den + alpha * g_den)[..., None], window
        if spec.normalize:
            g_num = g_num / (g_den[..., None] + spec.eps)
        out = alpha * g_num if out is None else out + alpha * g_num
    elif num is not None:
        out = num / den[..., None]
    if out is None:
        raise ValueError("this configuration attends to nothing: enable a local kernel or global")
    return out, window


def _softmax_and_sum(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, den)``: the softmax of ``scores`` over the last axis and the sum of ``e^{s − m}``
    (``m`` the row's largest score; ``[.., 1]``), so that ``p · den = e^{s − m}``. One fused
    ``Softmax`` pass where the exp, the sum and the division were three over a chunk's ``[..,
    Nq, Nk]`` scores; ``p``'s largest entry is ``e^0 / den``."""
    p = torch.softmax(scores, -1)
    return p, 1 / p.amax(-1, keepdim=True)


def _dot(q: Tensor, k: Tensor) -> Tensor:
    """``einsum("bhrqk,bhnk->bhrqn", q, k)``: every query head against every key, as one
    batched matmul (exported as a ``MatMul``, which onnxruntime runs 2.2x faster than its
    ``Einsum`` on a wide ring's 8,252 columns: 2.62 against 5.69 ms for 192 query rows)."""
    b, h, r, n, d = q.shape
    return (q.reshape(b, h, r * n, d) @ k.transpose(-1, -2)).unflatten(2, (r, n))


def _mix(w: Tensor, v: Tensor) -> Tensor:
    """``einsum("bhrqn,bhnv->bhrqv", w, v)``: weights over keys times their values, as one
    batched matmul (2.71 against 3.36 ms at 8,252 columns)."""
    r, n = w.shape[2:4]
    # (flatten, not a reshape to the keys' count: an exported graph where shape inference loses
    # ``w``'s shape would take the traced count for a constant, and a tree graph then fails
    # on a longer ring)
    return (w.flatten(2, 3) @ v).unflatten(2, (r, n))


def _sink_scores(q_sink: Tensor, k: Tensor, scores: Tensor, is_sink: Tensor, cols: slice) -> Tensor:
    """``scores[..., cols]`` with the sink columns among them scored by ``q_sink``."""
    part = _dot(q_sink, k[:, :, cols])
    return torch.where(is_sink[cols], part, scores[..., cols])


@dataclass(frozen=True)
class Retaining:
    """What :func:`attend` needs for the retained cache (:mod:`~linearize.ops.retain`): the
    cache ``rk, rv, rtimes, rscore``, the in-window attention each key column received before
    these queries (``base: [B,Hkv,Nk]``), the RoPE frequencies to un-rotate keys that leave
    (``None``: kept rotated) and whether the queries are consecutive tokens (else tree nodes,
    each with its own past)."""

    rk: Tensor
    rv: Tensor
    rtimes: Tensor
    rscore: Tensor
    base: Tensor
    inv_freq: Tensor | None
    causal: bool
    # The key columns that may leave the window, padded with −1 (a traced graph, whose shapes
    # cannot depend on the data); ``None``: found here.
    cols: Tensor | None = None
    # Tree nodes that form a chain (each node's ancestors: every node before it), with ``cols``
    # in the order the columns leave (by time): ranked as consecutive queries are.
    chain: bool = False


def _retained_readout(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    t_q: Tensor,
    t_k: Tensor,
    visible: Tensor,
    scores: Tensor,
    r: Retaining,
    q_sink: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The window's softmax (``scores``, masked) with the retained cache in its denominator →
    numerator, denominator and the in-window attention :func:`attend` returns (``q``,
    ``q_sink``: the queries scaled by 1/√K, as the scores are).

    The tokens that leave the window during these queries join the cache for the queries after
    they leave (each query: the ``M`` best of everything that left before it)."""
    m = scores.amax(-1, keepdim=True)
    p, den = _softmax_and_sum(scores)
    # The attention each key received inside the window (sinks score nothing), for ranking only;
    # summed over the query heads before the sinks are zeroed (a pass fewer over [.., R, Nq, Nk]).
    by_query = p.detach().sum(2) * (t_k >= spec.sinks)  # [B, Hkv, Nq, Nk]
    window = r.base + by_query.sum(2) if r.causal else by_query
    leaving = visible & ~spec.is_local(t_k, t_q) & (t_k >= spec.sinks)
    if r.cols is None:
        cols = leaving.any(0).nonzero()[:, 0]
        eligible = leaving[:, cols]
    else:
        cols = r.cols.clamp_min(0)
        eligible = leaving[:, cols] & (r.cols >= 0)
    if r.causal or r.chain:  # a left token's score is final: the totals rank it
        # Along a chain every node that saw a column in its window is an ancestor of each node
        # the column has left for: a node's own count is the total. O(Nq · (M + E)), not
        # select_per_query's O(Nq · (M + E)²) (half a chunk's time at 64 nodes).
        total = window if r.causal else r.base + by_query.sum(2)
        priority = retain.priority(total[..., cols], t_k[cols], spec.retain_halflife)
        chosen = retain.select_causal(
            r.rtimes, r.rscore, priority, t_k[cols], t_q, eligible, spec.retain
        )
    else:  # a node counts the attention of its own ancestors only
        ancestors = visible[:, -len(t_q) :].to(by_query.dtype)
        from_ancestors = torch.einsum("ij,bhjc->bhic", ancestors, by_query[..., cols])
        own = r.base[..., None, cols] + from_ancestors
        priority = retain.priority(own, t_k[cols], spec.retain_halflife)
        chosen = retain.select_per_query(
            r.rtimes, r.rscore, priority, t_k[cols], eligible, spec.retain
        )
    rk = torch.cat([r.rk, retain.unrotate(k[:, :, cols], t_k[cols], r.inv_freq)], 2)
    rv = torch.cat([r.rv, v[:, :, cols]], 2)
    reader = q if q_sink is None else q_sink
    far = _dot(reader, rk)
    # Weighed e^{s−m} as the window is, m its largest score: the global part's weights in a
    # shared denominator are relative to that m.
    far = torch.exp(far.masked_fill(~chosen[:, :, None], float("-inf")) - m)
    num = _mix(p, v) * den + _mix(far, rv)
    return num, den[..., 0] + far.sum(-1), window


def _decay(spec: LinearAttnSpec, distance: Tensor, dtype: torch.dtype) -> Tensor:
    """``decay^distance`` for ``distance >= 0`` (masked entries, negative, give 1)."""
    return torch.exp(distance.clamp_min(0).to(dtype) * math.log(spec.decay))


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def advance(
    spec: LinearAttnSpec, state: LinearAttnState, k: Tensor, fk: Tensor, v: Tensor
) -> LinearAttnState:
    """The state after the tokens ``k: [B,Hkv,T,K]``, ``fk``, ``v`` (times ``pos..pos+T-1``).

    Not with ``spec.retain``: which tokens are retained depends on the queries (run
    :func:`parallel` on the tokens instead)."""
    if spec.retain:
        raise ValueError("with a retained cache the state depends on the queries: use parallel")
    if k.shape[2] == 0:
        return state
    all_k, all_fk, all_v, t0 = _with_state_keys(state, k, fk, v)
    return _fold(spec, state, all_k, all_fk, all_v, t0)


def _fold(
    spec: LinearAttnSpec,
    state: LinearAttnState,
    k: Tensor,
    fk: Tensor,
    v: Tensor,
    t0: Tensor,
    window: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> LinearAttnState:
    """Keep what future queries may still see locally, fold the rest into ``S, z``.

    ``k, fk, v: [B, Hkv, n + T, ·]`` are the state's kept tokens followed by ``T`` new ones.
    Without sinks the kept tokens are consecutive in time, so what leaves is a prefix and the
    fold is a slice; with sinks the general mask is used. With ``spec.retain``, ``window: [B,
    Hkv, n + T]`` is each token's in-window attention: the tokens that leave compete for the
    retained cache, the kept ones carry their score on.
    """
    T = k.shape[2] - state.n
    pos = state.pos + T
    if spec.sinks:
        all_t = torch.cat([t0, torch.arange(state.pos, pos, device=t0.device)])
        keep = spec.is_local(all_t, torch.tensor([pos], device=t0.device))[0]
        order = torch.cat([(~keep).nonzero()[:, 0], keep.nonzero()[:, 0]])
        k, fk, v, all_t = k[:, :, order], fk[:, :, order], v[:, :, order], all_t[order]
        window = None if window is None else window[..., order]
        gone = int((~keep).sum())
        times = all_t[gone:]
        gone_t = all_t[:gone]
    else:
        first = state.pos - state.n  # the time of the oldest kept token
        cutoff = (pos // spec.size) * spec.size if spec.window == "group" else pos - spec.size + 1
        gone = min(max(cutoff - first, 0), k.shape[2])
        times = torch.arange(first + gone, pos, device=t0.device)
        gone_t = torch.arange(first, first + gone, device=t0.device)
    S, z = state.S, state.z
    if spec.use_global and spec.decay < 1:
        # S and z are kept decayed to the next token's time: age them by the T new tokens.
        S, z = S * spec.decay**T, z * spec.decay**T
        fk_gone = fk[:, :, :gone] * _decay(spec, pos - gone_t, fk.dtype)[:, None]
    else:
        fk_gone = fk[:, :, :gone]
    if spec.use_global and gone:
        S = S + torch.einsum("bhnf,bhnv->bhfv", fk_gone, v[:, :, :gone])
        z = z + fk_gone.sum(2)
    n = k.shape[2] - gone
    pad = spec.capacity - n
    kept = [lazy_padded(x[:, :, gone:], spec.capacity, 2) for x in (k, fk, v)]
    times = F.pad(times, (0, pad), value=-1)
    retained = {}
    if spec.retain:
        if window is None:
            raise ValueError("a retained cache needs each token's in-window attention")
        cache = retain.merge(
            state.rk, state.rv, state.rtimes, state.rscore,
            retain.unrotate(k[:, :, :gone], gone_t, inv_freq), v[:, :, :gone], gone_t,
            retain.priority(window[..., :gone], gone_t, spec.retain_halflife),
        )  # fmt: skip
        score = F.pad(window[..., gone:].detach(), (0, pad))
        retained = dict(zip(RETAINED, (score, *cache), strict=True))
    return LinearAttnState(S, z, *kept, times, n, pos, **retained)


def _with_state_keys(state: LinearAttnState, k: Tensor, fk: Tensor, v: Tensor):
    k0, fk0, v0, t0 = state.kept()
    return torch.cat([k0, k], 2), torch.cat([fk0, fk], 2), torch.cat([v0, v], 2), t0


# --- the four forms -------------------------------------------------------------------------


def parallel(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    state: LinearAttnState,
    alpha: Tensor | float = 1.0,
    *,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnState]:
    """All ``T`` queries at once against the state's buffer and each other: ``O(T²)``.

    ``inv_freq`` (with ``spec.retain``): the RoPE frequencies that un-rotate retained keys
    (:mod:`~linearize.ops.retain`); every form takes it."""
    t_q = torch.arange(state.pos, state.pos + q.shape[1], device=q.device)
    o, keys = _attend_on_state(
        spec, q, k, v, fq, fk, state, alpha, t_q, causal=True, q_sink=q_sink, inv_freq=inv_freq
    )
    return o, _fold(spec, state, *keys, inv_freq=inv_freq)


def _attend_on_state(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    state: LinearAttnState,
    alpha: Tensor | float,
    t_q: Tensor,
    causal: bool = False,
    ancestors: Tensor | None = None,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """New tokens at times ``t_q`` attend to the state's kept tokens and to each other (each sees
    the earlier ones when ``causal``, else its ``ancestors``). Returns ``o: [B, N, H, V]`` and
    the concatenated (kept + new) keys, features, values, kept times and (with ``spec.retain``)
    in-window attention."""
    B, N, H, _ = q.shape
    Hkv = k.shape[2]
    keys, feats, vals, t_kept = _with_state_keys(
        state, _heads_first(k), _heads_first(fk), _heads_first(v)
    )
    if causal:
        visible = torch.cat([t_kept, t_q])[None, :] <= t_q[:, None]
    else:
        committed = torch.ones(N, state.n, dtype=torch.bool, device=q.device)
        visible = torch.cat([committed, ancestors.to(q.device)], 1)
    retaining = None
    if spec.retain:
        base = torch.cat([state.score[:, :, : state.n], state.score.new_zeros(B, Hkv, N)], 2)
        cache = (state.rk, state.rv, state.rtimes, state.rscore)
        retaining = Retaining(*cache, base, inv_freq, causal)
    o, window = attend(
        spec,
        _group_queries(q, Hkv),
        keys,
        vals,
        _group_queries(fq, Hkv),
        feats,
        t_q,
        torch.cat([t_kept, t_q]),
        visible,
        state.S,
        state.z,
        alpha,
        s_time=state.pos,
        q_sink=None if q_sink is None else _group_queries(q_sink, Hkv),
        prune=keys.shape[2] >= PRUNE_FROM,
        retaining=retaining,
    )
    return o.reshape(B, H, N, v.shape[-1]).transpose(1, 2), (keys, feats, vals, t_kept, window)


def chunk(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    state: LinearAttnState,
    alpha: Tensor | float = 1.0,
    chunk_size: int = 64,
    *,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnState]:
    """Parallel inside chunks of ``chunk_size`` tokens, the state carried between: ``O(T)``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    outputs = [v.new_zeros(q.shape[0], 0, q.shape[2], v.shape[-1])]
    for s in range(0, q.shape[1], chunk_size):
        e = s + chunk_size
        piece = (x[:, s:e] for x in (q, k, v, fq, fk))
        sink = None if q_sink is None else q_sink[:, s:e]
        o, state = parallel(spec, *piece, state, alpha, q_sink=sink, inv_freq=inv_freq)
        outputs.append(o)
    return torch.cat(outputs, 1), state


def recurrent(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    state: LinearAttnState,
    alpha: Tensor | float = 1.0,
    *,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnState]:
    """One token at a time on the fixed-size state (the decoding form)."""
    if not _has_fast_step(spec):
        return chunk(
            spec, q, k, v, fq, fk, state, alpha, chunk_size=1, q_sink=q_sink, inv_freq=inv_freq
        )
    outputs = [v.new_zeros(q.shape[0], 0, q.shape[2], v.shape[-1])]
    for t in range(q.shape[1]):
        token = (x[:, t] for x in (q, k, v, fq, fk))
        sink = None if q_sink is None else q_sink[:, t]
        o, state = step(spec, *token, state, alpha, q_sink=sink, inv_freq=inv_freq)
        if q.shape[1] == 1:  # the decoding hot path: no concatenation
            return o[:, None], state
        outputs.append(o[:, None])
    return torch.cat(outputs, 1), state


def _has_fast_step(spec: LinearAttnSpec) -> bool:
    if spec.retain:  # sliding windows of 2 or more; else the general form, a token at a time
        return spec.window == "sliding" and spec.size >= 2
    pure = spec.capacity == 0 and spec.local == "none"
    if spec.window == "sliding":
        return pure or spec.size >= 1
    return spec.sinks == 0


def _append(
    state: LinearAttnState, k: Tensor, fk: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The buffer (keys, features, values, times) with the token at ``pos`` in slot ``n``, a
    slot ``state`` does not read: written in place (O(1) per token), or into a copy where autograd
    needs the old buffer as it was."""
    n = state.n
    if any(t.requires_grad for t in (k, fk, v, state.k, state.fk, state.v)):
        buffers = [x.clone() for x in (state.k, state.fk, state.v, state.times)]
    else:
        buffers = [state.k, state.fk, state.v, state.times]
    for buffer, x in zip(buffers[:3], (k, fk, v), strict=True):
        buffer[:, :, n] = x
    buffers[3][n] = state.pos
    return tuple(buffers)


def _fold_one(spec: LinearAttnSpec, S: Tensor, z: Tensor, fk: Tensor, v: Tensor):
    """``S, z`` aged by one token, then the token that leaves the window (``fk: [B, Hkv, F]``,
    ``v``; ``W`` tokens before the next one, so aged ``decay^W``) folded in."""
    if spec.decay < 1:
        S, z = S * spec.decay, z * spec.decay
    f = fk * spec.decay**spec.size if spec.decay < 1 else fk
    return S + _outer(f, v), z + f


def _sliding_step(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    state: LinearAttnState,
    alpha: Tensor | float,
    q_sink: Tensor | None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnState]:
    """One token on a sliding window. While the window fills, the token takes the next free
    slot (in place: no copy). Once full, the token at ``pos + 1 − W`` (the first after the sinks)
    leaves for ``S, z``: the buffer, kept in time order (sinks, then the window), is rebuilt once
    without it, and the leaving token is read as one extra column, so the buffer is copied once
    per token and never concatenated for the readout."""
    n, pos = state.n, state.pos
    S, z = state.S, state.z
    i = None
    if pos + 1 - spec.size < spec.sinks:  # nothing leaves yet
        keys, feats, values, times = _append(state, k, fk, v)
        m, extra = n + 1, None
    else:
        i = min(spec.sinks, pos)  # the leaving token's place among the buffer and the token
        old = (state.k, state.fk, state.v)
        if i < n:
            keys, feats, values = (
                torch.cat([x[:, :, :i], x[:, :, i + 1 : n], t[:, :, None]], 2)
                for x, t in zip(old, (k, fk, v), strict=True)
            )
            times = torch.cat(
                [state.times[:i], state.times[i + 1 : n], state.times.new_tensor([pos])]
            )
            leaving = tuple(x[:, :, i] for x in old)
        else:  # a window of one: the token itself leaves
            keys, feats, values = (x[:, :, :n].clone() for x in old)
            times = state.times[:n].clone()
            leaving = (k, fk, v)
        m, extra = n, (leaving[0][:, :, None], leaving[2][:, :, None])
    local = keys[:, :, :m], values[:, :, :m]
    retained = {}
    if spec.retain:
        num, den, retained = _step_retained_readout(
            spec, q, *local, extra, state, i, q_sink, min(spec.sinks, pos + 1), inv_freq
        )
    else:
        num, den = _local_readout(spec, q, *local, q_sink, min(spec.sinks, pos + 1), extra=extra)
    o = _combine(spec, num, den, fq, S, z, alpha)
    if spec.use_global:
        if extra is not None:
            S, z = _fold_one(spec, S, z, leaving[1], leaving[2])
        elif spec.decay < 1:
            S, z = S * spec.decay, z * spec.decay
    return o, LinearAttnState(S, z, keys, feats, values, times, m, pos + 1, **retained)


def _step_retained_readout(
    spec: LinearAttnSpec,
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    extra: tuple[Tensor, Tensor] | None,
    state: LinearAttnState,
    i: int | None,
    q_sink: Tensor | None,
    num_sinks: int,
    inv_freq: Tensor | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`_local_readout` with the retained cache, for one decoding step: the window (the
    rebuilt buffer ``keys, values``, and the leaving token as ``extra`` when slot ``i`` of the
    state's buffer leaves) and the cache in one softmax; returns numerator, denominator and the
    state's new scores and cache (the leaving token, its score now final, competes for it)."""
    B, Hkv, R, K = q.shape
    C = state.score.shape[-1]
    scores = _window_scores(q, keys, q_sink, num_sinks, None, extra)
    m = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - m)
    den = weights.sum(-1)
    n = keys.shape[2]
    num = _window_values(weights, values, extra)
    far_num, far_den = cache_readout(q, q_sink, state.rk, state.rv, state.rtimes, m)
    num = num + far_num
    # In-window attention: the buffer's scores (rebuilt as the buffer was), plus this query's.
    attention = (weights / den[..., None]).detach().sum(2)  # [B, Hkv, n (+1)]
    attention[..., :num_sinks] = 0
    old = state.score
    if i is None:  # the token took slot n
        score = torch.cat([old[..., : n - 1], old.new_zeros(B, Hkv, 1)], -1)
    else:
        score = torch.cat([old[..., :i], old[..., i + 1 : n], old.new_zeros(B, Hkv, 1)], -1)
    score = score + attention[..., :n]
    cache = (state.rk, state.rv, state.rtimes, state.rscore)
    if extra is not None:
        t = state.times[i : i + 1]
        final = old[..., i : i + 1] + attention[..., n:]
        priority = retain.priority(final, t, spec.retain_halflife)
        key = retain.unrotate(extra[0], t, inv_freq)
        cache = retain.merge(*cache, key, extra[1], t, priority)
    retained = dict(zip(RETAINED, (F.pad(score, (0, C - n)), *cache), strict=True))
    return num, den + far_den, retained


def cache_readout(
    q: Tensor, q_sink: Tensor | None, rk: Tensor, rv: Tensor, rtimes: Tensor, m: Tensor
) -> tuple[Tensor, Tensor]:
    """A decoding step's reading of the retained cache (``rk, rv: [B,Hkv,M,·]``, ``rtimes``:
    −1 empty) by ``q_sink`` (or ``q``: ``[B,Hkv,R,K]``), weighed ``e^{s−m}`` with the window's
    ``m`` (``[B,Hkv,R,1]``): the numerator ``[B,Hkv,R,V]`` and denominator ``[B,Hkv,R]`` it adds."""
    reader = q if q_sink is None else q_sink
    far = torch.matmul(reader, rk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    far = torch.exp(far.masked_fill((rtimes < 0)[:, :, None], float("-inf")) - m)
    return torch.matmul(far, rv), far.sum(-1)


def _outer(fk: Tensor, v: Tensor) -> Tensor:
    """``fk: [B, Hkv, F]``, ``v: [B, Hkv, V]`` → ``[B, Hkv, F, V]``."""
    return fk[..., :, None] * v[..., None, :]


def step(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    state: LinearAttnState,
    alpha: Tensor | float = 1.0,
    *,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnState]:
    """One decoding step, ``q: [B, H, K]``, ``k: [B, Hkv, K]``, ... → ``o: [B, H, V]``.

    The hot path of decoding. At time ``τ = pos`` every kept token and the new one are local
    (that is what "kept" means), so no masks are built: local attention over the buffer plus
    the token, global attention through ``S, z`` alone. For pure linear attention, group
    windows without sinks and sliding windows with or without sinks (``recurrent`` falls back
    to the general form otherwise). The token is written into the buffer's next free slot in
    place where it fits (see :class:`LinearAttnState`).
    """
    if spec.retain and not _has_fast_step(spec):
        raise ValueError("this retained cache has no fast step: use recurrent (the general form)")
    B, H, K = q.shape
    Hkv = k.shape[1]
    q, fq = q.view(B, Hkv, H // Hkv, K), fq.view(B, Hkv, H // Hkv, -1)
    S, z, n, pos = state.S, state.z, state.n, state.pos
    if spec.capacity == 0:
        # Pure linear attention: the token is global to itself, so fold it first; then age
        # S, z by one step (they sit at the next token's time).
        S = S + _outer(fk, v)
        z = z + fk
        o = alpha * _global_readout(spec, fq, S, z)
        if spec.decay < 1:
            S, z = S * spec.decay, z * spec.decay
        new = LinearAttnState(S, z, state.k, state.fk, state.v, state.times, 0, pos + 1)
        return o.reshape(B, H, -1), new
    if q_sink is not None:
        q_sink = q_sink.view(B, Hkv, H // Hkv, K)
    if spec.window == "sliding":
        o, new = _sliding_step(spec, q, k, v, fq, fk, state, alpha, q_sink, inv_freq)
        return o.reshape(B, H, -1), new
    if (pos + 1) % spec.size != 0:
        # Inside a group: the token joins the buffer.
        keys, feats, values, times = _append(state, k, fk, v)
        local = keys[:, :, : n + 1], values[:, :, : n + 1]
        num, den = _local_readout(spec, q, *local, q_sink, min(spec.sinks, pos + 1))
        o = _combine(spec, num, den, fq, S, z, alpha)
        if spec.use_global and spec.decay < 1:
            S, z = S * spec.decay, z * spec.decay
        new = LinearAttnState(S, z, keys, feats, values, times, n + 1, pos + 1)
        return o.reshape(B, H, -1), new
    # The group is complete with this token: read it as one extra column, then fold the whole
    # group into S and empty the buffer.
    extra = k[:, :, None], v[:, :, None]
    local = state.k[:, :, :n], state.v[:, :, :n]
    num, den = _local_readout(spec, q, *local, q_sink, min(spec.sinks, pos + 1), extra=extra)
    o = _combine(spec, num, den, fq, S, z, alpha)
    if spec.use_global and spec.decay < 1:
        S, z = S * spec.decay, z * spec.decay
    if spec.use_global:
        feats = torch.cat([state.fk[:, :, :n], fk[:, :, None]], 2)
        values = torch.cat([state.v[:, :, :n], v[:, :, None]], 2)
        if spec.decay < 1:
            ages = torch.arange(n + 1, 0, -1, device=feats.device)
            feats = feats * _decay(spec, ages, feats.dtype)[:, None]
        S = S + torch.einsum("bhnf,bhnv->bhfv", feats, values)
        z = z + feats.sum(2)
    new = LinearAttnState(
        S,
        z,
        torch.zeros_like(state.k),
        torch.zeros_like(state.fk),
        torch.zeros_like(state.v),
        torch.full_like(state.times, -1),
        0,
        pos + 1,
    )
    return o.reshape(B, H, -1), new


def _global_parts(fq: Tensor, S: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``fq: [B, Hkv, R, F]`` against the folded summary → numerator ``[B, Hkv, R, V]`` and
    denominator ``[B, Hkv, R]``."""
    return torch.matmul(fq, S), torch.matmul(fq, z[..., None])[..., 0]


def _global_readout(spec: LinearAttnSpec, fq: Tensor, S: Tensor, z: Tensor) -> Tensor:
    """``fq: [B, Hkv, R, F]`` against the folded summary → ``[B, Hkv, R, V]``."""
    num, den = _global_parts(fq, S, z)
    return num / (den[..., None] + spec.eps) if spec.normalize else num


def _local_readout(
    spec: LinearAttnSpec,
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    q_sink: Tensor | None = None,
    num_sinks: int = 0,
    valid: Tensor | None = None,
    extra: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``q: [B, Hkv, R, K]`` over the keys of ``keys: [B, Hkv, n, K]`` (every one, or those
    ``valid: [B, n]`` marks; the first ``num_sinks`` scored by ``q_sink``) and the ``extra``
    keys and values (``[B, Hkv, e, ·]``, never sinks: a column read beside the buffer instead of
    concatenated to it) → numerator ``[B, Hkv, R, V]`` and, for softmax, denominator
    ``[B, Hkv, R]`` (the weights are ``e^{s−m}``, ``m`` the largest score)."""
    mask = None if valid is None else valid[:, None, None, :]
    if spec.local == "softmax":
        scores = _window_scores(q, keys, q_sink, num_sinks, mask, extra)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        return _window_values(weights, values, extra), weights.sum(-1)
    if spec.local == "relu2":
        weights = torch.relu(torch.matmul(_unit(q), _unit(keys).transpose(-1, -2))) ** 2
        if mask is not None:
            weights = weights * mask
        num = torch.matmul(weights, values)
        if extra is not None:
            more = torch.relu(torch.matmul(_unit(q), _unit(extra[0]).transpose(-1, -2))) ** 2
            num = num + torch.matmul(more, extra[1])
        return num, None
    return q.new_zeros(*q.shape[:-1], values.shape[-1]), None


def _window_scores(
    q: Tensor,
    keys: Tensor,
    q_sink: Tensor | None,
    num_sinks: int,
    mask: Tensor | None,
    extra: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """A decoding step's scaled window scores ``[B, Hkv, R, n (+ e)]``: the buffer's keys (the
    first ``num_sinks`` scored by ``q_sink``; ``mask`` off: −inf), then the ``extra`` keys."""
    scores = torch.matmul(q, keys.transpose(-1, -2))
    if q_sink is not None and num_sinks:
        sinks = torch.matmul(q_sink, keys[:, :, :num_sinks].transpose(-1, -2))
        scores = torch.cat([sinks, scores[..., num_sinks:]], -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if extra is not None:
        scores = torch.cat([scores, torch.matmul(q, extra[0].transpose(-1, -2))], -1)
    return scores / math.sqrt(q.shape[-1])


def _window_values(weights: Tensor, values: Tensor, extra: tuple[Tensor, Tensor] | None) -> Tensor:
    """``weights @ [values; extra values]`` without concatenating them."""
    n = values.shape[2]
    num = torch.matmul(weights[..., :n], values)
    if extra is not None:
        num = num + torch.matmul(weights[..., n:], extra[1])
    return num


def _combine(
    spec: LinearAttnSpec,
    num: Tensor,
    den: Tensor | None,
    fq: Tensor,
    S: Tensor,
    z: Tensor,
    alpha: Tensor | float,
) -> Tensor:
    """One decoding step's output from its local readout (``num``, ``den``) and the global
    summary ``S, z`` read by ``fq: [B, Hkv, R, F]``: one shared denominator, or local + α·global."""
    if spec.combine == "shared" and spec.use_global:
        g_num, g_den = _global_parts(fq, S, z)
        return (num + alpha * g_num) / (den + alpha * g_den)[..., None]
    o = num if den is None else num / den[..., None]
    if spec.use_global:
        o = o + alpha * _global_readout(spec, fq, S, z)
    return o


def tree(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    state: LinearAttnState,
    alpha: Tensor | float = 1.0,
    *,
    tree: Tree,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnState]:
    """Candidate tokens arranged as a tree on top of the committed state.

    Node ``i`` sits at time ``state.pos + depth_i``; its past is the committed sequence followed
    by its ancestors (``tree.ancestors``). Groups are counted in time, so trees crossing group
    boundaries are exact. The state is returned unchanged: commit an accepted path with
    :func:`advance` (with ``spec.retain``: :func:`parallel` on the path).
    """
    t_q = state.pos + tree.depths.to(q.device)
    o, _ = _attend_on_state(
        spec, q, k, v, fq, fk, state, alpha, t_q,
        ancestors=tree.ancestors, q_sink=q_sink, inv_freq=inv_freq,
    )  # fmt: skip
    return o, state


def naive(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    alpha: Tensor | float = 1.0,
    *,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> Tensor:
    """The definition, token by token over the full history, from the start of the sequence.

    The reference the other forms are tested against; ``O(T²)`` in time, no state. The retained
    cache (``spec.retain``) is chosen here by sorting, per batch row and key head, every token
    that left the window by its total in-window attention.
    """
    B, T, H, K = q.shape
    Hkv = k.shape[2]
    R = H // Hkv
    kr, fkr, vr = (x.repeat_interleave(R, dim=2) for x in (k, fk, v))
    far_keys = retain.unrotate(k.transpose(1, 2), torch.arange(T), inv_freq).transpose(1, 2)
    received = torch.zeros(B, T, Hkv, dtype=q.dtype)  # in-window attention, per key head
    outputs = []
    for t in range(T):
        s = torch.arange(t + 1)
        local = spec.is_local(s, torch.tensor([t]))[0]
        o = torch.zeros_like(vr[:, 0])
        if spec.local == "softmax":
            scores = (q[:, t, None] * kr[:, : t + 1]).sum(-1)
            if q_sink is not None:
                sink_scores = (q_sink[:, t, None] * kr[:, : t + 1]).sum(-1)
                scores = torch.where((s < spec.sinks)[None, :, None], sink_scores, scores)
            scores = scores.masked_fill(~local[None, :, None], float("-inf")) / math.sqrt(K)
            weights = torch.exp(scores - scores.amax(1, keepdim=True))
            local_num, local_den = (weights[..., None] * vr[:, : t + 1]).sum(1), weights.sum(1)
            if spec.retain:
                probs = (weights / local_den[:, None]).detach() * (s >= spec.sinks)[None, :, None]
                received[:, : t + 1] += probs.view(B, t + 1, Hkv, R).sum(-1)
                kept = _retained_naive(spec, received[:, : t + 1], local)  # [B, t+1, Hkv]
                reader = q if q_sink is None else q_sink
                far = (reader[:, t, None] * far_keys[:, : t + 1].repeat_interleave(R, 2)).sum(-1)
                far = far / math.sqrt(K)
                far = far.masked_fill(~kept.repeat_interleave(R, 2), float("-inf"))
                # One softmax over the window and the retained tokens (the max cancels).
                far_w = torch.exp(far - scores.amax(1, keepdim=True))
                local_num = local_num + (far_w[..., None] * vr[:, : t + 1]).sum(1)
                local_den = local_den + far_w.sum(1)
            o = o + local_num / local_den[..., None]
        elif spec.local == "relu2":
            cos = (_unit(q[:, t, None]) * _unit(kr[:, : t + 1])).sum(-1)
            weights = torch.relu(cos) ** 2 * local[None, :, None]
            o = o + (weights[..., None] * vr[:, : t + 1]).sum(1)
        if spec.use_global:
            weights = (fq[:, t, None] * fkr[:, : t + 1]).sum(-1) * ~local[None, :, None]
            weights = weights * spec.decay ** (t - s).to(weights.dtype)[None, :, None]
            g = (weights[..., None] * vr[:, : t + 1]).sum(1)
            if spec.combine == "shared":
                g_den = alpha * weights.sum(1)
                o = (local_num + alpha * g) / (local_den + g_den)[..., None]
            else:
                if spec.normalize:
                    g = g / (weights.sum(1)[..., None] + spec.eps)
                o = o + alpha * g
        outputs.append(o)
    return torch.stack(outputs, 1)


def _retained_naive(spec: LinearAttnSpec, received: Tensor, local: Tensor) -> Tensor:
    """``[B, t+1, Hkv]``: the ``spec.retain`` tokens with the most in-window attention
    (``received``, final once a token left) among those that left the window (not ``local``,
    not sinks); ties go to the later token."""
    B, n, Hkv = received.shape
    kept = torch.zeros(B, n, Hkv, dtype=torch.bool)
    left = [s for s in range(n) if not local[s] and s >= spec.sinks]
    h = spec.retain_halflife

    def rank(b: int, s: int, head: int) -> tuple[float, int]:
        a = float(received[b, s, head])
        if not h:
            return a, s
        return (math.log2(a) if a > 0 else float("-inf")) + s / h, s

    for b in range(B):
        for head in range(Hkv):
            best = sorted(left, key=lambda s: rank(b, s, head), reverse=True)
            kept[b, best[: spec.retain], head] = True
    return kept
