"""Sliding-window linear attention for many sequences decoded together (continuous batching).

A server decodes ``B`` independent sequences ("rows") step by step, each at its own position,
rows joining and leaving between steps. :class:`LinearAttnRows` holds one layer's state of up to
``R`` rows in fixed-size tensors that :func:`step_rows` updates **in place**, so one step of all
rows is one vectorised computation with no per-row Python loop and no copy of the kept tokens:

- the kept tokens live in a **ring** of ``C = sinks + size`` slots per row; the token at time
  ``t`` sits at slot ``t`` if it is a sink (``t < sinks``), else at
  ``sinks + (t − sinks) mod size``; ``times [R, C]`` says which time each slot holds (−1: empty),
  so a row whose window is still filling is masked, not padded;
- a step at time ``τ`` writes the new token into its slot (empty: the token that had it left
  the window a step ago), attends over the row's valid slots exactly as
  :func:`~linearize.ops.linear_attn.step` does over its buffer (softmax is permutation invariant,
  so ring order is fine; sinks, identified by their time, are scored with ``q_sink``), then folds
  the token at ``τ + 1 − size`` (unless a sink) into ``S, z`` with the decay as
  ``linear_attn.step`` does, and empties its slot.

Between steps a row holds exactly the tokens of the :class:`LinearAttnState` it stands for
(:func:`write_row` / :func:`read_row` convert, :func:`step_rows_reference` is the per-row
reference), and its size never depends on the sequence length. Covers sliding windows
(``size >= 2``, with or without sinks, softmax or relu2 locally, any global part, a retained
cache) and pure linear attention (no buffer); :func:`supports_rows` says which specs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops import linear_attn, retain
from linearize.ops.buffers import lazy_zeros
from linearize.ops.linear_attn import RETAINED, LinearAttnSpec, LinearAttnState

# What an empty entry holds, by field (else 0).
_EMPTY = {"times": -1, "rtimes": -1, "rscore": float("-inf")}


@dataclass
class LinearAttnRows:
    """``R`` rows of one layer: ``S [R,Hkv,F,V]``, ``z [R,Hkv,F]``, ring buffers ``k [R,Hkv,C,K]``,
    ``fk [R,Hkv,C,F]``, ``v [R,Hkv,C,V]``, ``times [R,C]`` (−1: empty slot) and ``pos [R]``;
    with a retained cache (``spec.retain = M``, :mod:`~linearize.ops.retain`) also each slot's
    in-window attention ``score [R,Hkv,C]`` and the cache ``rk [R,Hkv,M,K]``, ``rv``, ``rtimes``
    and ``rscore [R,Hkv,M]`` (in no particular order; ``None`` without). A step of ``B`` rows uses
    rows ``0..B-1``."""

    S: Tensor
    z: Tensor
    k: Tensor
    fk: Tensor
    v: Tensor
    times: Tensor
    pos: Tensor
    score: Tensor | None = None
    rk: Tensor | None = None
    rv: Tensor | None = None
    rtimes: Tensor | None = None
    rscore: Tensor | None = None

    def _named(self) -> dict[str, Tensor]:
        named = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: t for name, t in named.items() if t is not None}

    def _tensors(self) -> tuple[Tensor, ...]:
        return tuple(self._named().values())

    @property
    def capacity(self) -> int:
        """How many rows fit."""
        return self.S.shape[0]

    def row_nbytes(self) -> int:
        """Bytes of one row's state (fixed: it never depends on the row's position)."""
        return sum(t[0].numel() * t.element_size() for t in self._tensors())


def supports_rows(spec: LinearAttnSpec) -> bool:
    """Whether :func:`step_rows` covers ``spec``: sliding windows of ``size >= 2`` with a local
    kernel (and a retained cache or none), or pure linear attention (the others decode row by
    row with ``linear_attn.recurrent``)."""
    if spec.window != "sliding":
        return False
    if spec.capacity == 0:
        return spec.local == "none"
    return spec.size >= 2 and spec.local != "none"


def ring_size(spec: LinearAttnSpec) -> int:
    """Slots per row: the sinks and one window (one more than ``spec.capacity``, so the new
    token is written before it attends)."""
    return 0 if spec.capacity == 0 else spec.sinks + spec.size


def ring_reach(spec: LinearAttnSpec, pos: Tensor) -> int:
    """How many leading slots of the rings can be filled for rows at times ``pos`` (each row's
    newest token written): slots fill in order until a ring wraps, so the rest are empty in
    every row. (One host sync: the step's shapes depend on it.)"""
    return min(ring_size(spec), int(pos.max()) + 1)


def ring_slot(spec: LinearAttnSpec, times: Tensor) -> Tensor:
    """The slot of the token at each time of ``times`` (any shape)."""
    window = spec.sinks + (times - spec.sinks) % spec.size
    return torch.where(times < spec.sinks, times, window)


def init_rows(
    spec: LinearAttnSpec,
    capacity: int,
    num_kv_heads: int,
    key_dim: int,
    feature_dim: int,
    value_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LinearAttnRows:
    if not supports_rows(spec):
        raise ValueError(f"{spec} has no batched rows step (see supports_rows)")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 row, got {capacity}")
    R, Hkv, C = capacity, num_kv_heads, ring_size(spec)
    zeros = dict(dtype=dtype, device=device)
    retained = linear_attn.retained_buffers(
        spec, R, Hkv, C, key_dim, value_dim, dtype=dtype, device=device
    )
    return LinearAttnRows(
        S=torch.zeros(R, Hkv, feature_dim, value_dim, **zeros),
        z=torch.zeros(R, Hkv, feature_dim, **zeros),
        k=lazy_zeros(R, Hkv, C, key_dim, **zeros),
        fk=lazy_zeros(R, Hkv, C, feature_dim, **zeros),
        v=lazy_zeros(R, Hkv, C, value_dim, **zeros),
        times=torch.full((R, C), -1, dtype=torch.long, device=device),
        pos=torch.zeros(R, dtype=torch.long, device=device),
        **retained,
    )


def resize_rows(rows: LinearAttnRows, capacity: int) -> LinearAttnRows:
    """New rows of ``capacity`` holding the first ``min(capacity, rows.capacity)`` rows."""
    n = min(capacity, rows.capacity)
    out = {}
    for name, t in rows._named().items():
        out[name] = t.new_full((capacity, *t.shape[1:]), _EMPTY.get(name, 0))
        out[name][:n] = t[:n]
    return LinearAttnRows(**out)


def write_row(spec: LinearAttnSpec, rows: LinearAttnRows, i: int, state: LinearAttnState) -> None:
    """Row ``i`` becomes (a copy of) ``state``, a batch-1 state: each kept token at its slot."""
    if state.S.shape[0] != 1:
        raise ValueError(f"write_row takes a batch-1 state, got batch {state.S.shape[0]}")
    rows.S[i], rows.z[i] = state.S[0], state.z[0]
    rows.pos[i] = state.pos
    if not ring_size(spec):
        return
    for t in (rows.k, rows.fk, rows.v):
        t[i].zero_()
    rows.times[i] = -1
    k, fk, v, times = state.kept()
    slots = ring_slot(spec, times.to(rows.times.device))
    for ring, kept in ((rows.k, k), (rows.fk, fk), (rows.v, v)):
        ring[i][:, slots] = kept[0]
    rows.times[i, slots] = times
    if spec.retain:
        rows.score[i].zero_()
        rows.score[i][:, slots] = state.score[0, :, : state.n]
        for name in RETAINED[1:]:
            getattr(rows, name)[i] = getattr(state, name)[0]


def read_row(spec: LinearAttnSpec, rows: LinearAttnRows, i: int) -> LinearAttnState:
    """Row ``i`` as a batch-1 :class:`LinearAttnState` (a copy, buffer in time order)."""
    S, z, pos = rows.S[i : i + 1].clone(), rows.z[i : i + 1].clone(), int(rows.pos[i])
    C = spec.capacity
    if not ring_size(spec):
        k, fk, v = (t[i : i + 1].clone() for t in (rows.k, rows.fk, rows.v))
        return LinearAttnState(S, z, k, fk, v, rows.times[i].clone(), 0, pos)
    times = rows.times[i]
    slots = (times >= 0).nonzero()[:, 0]
    slots = slots[times[slots].argsort()]
    n = len(slots)
    k, fk, v = (F.pad(t[i : i + 1, :, slots], (0, 0, 0, C - n)) for t in (rows.k, rows.fk, rows.v))
    retained = {}
    if spec.retain:
        # The cache in the state's order: decreasing (score, time), as retain.merge leaves it.
        rtimes, rscore = rows.rtimes[i : i + 1], rows.rscore[i : i + 1]
        order = retain.ranking(rtimes, rscore)
        pick = lambda x: x.gather(2, order[..., None].expand_as(x))  # noqa: E731
        retained = dict(
            score=F.pad(rows.score[i : i + 1, :, slots], (0, C - n)),
            rk=pick(rows.rk[i : i + 1]),
            rv=pick(rows.rv[i : i + 1]),
            rtimes=rtimes.gather(-1, order),
            rscore=rscore.gather(-1, order),
        )
    times = F.pad(times[slots], (0, C - n), value=-1)
    return LinearAttnState(S, z, k, fk, v, times, n, pos, **retained)


def copy_row(rows: LinearAttnRows, src: int, dst: int) -> None:
    """Row ``dst`` becomes a copy of row ``src``."""
    for t in rows._tensors():
        t[dst] = t[src]


def step_rows(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    rows: LinearAttnRows,
    alpha: Tensor | float = 1.0,
    *,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnRows]:
    """One decoding step of rows ``0..B-1``, each at its own position: ``q: [B, H, K]``,
    ``k: [B, Hkv, K]``, ``v: [B, Hkv, V]``, ``fq: [B, H, F]``, ``fk: [B, Hkv, F]`` →
    ``o: [B, H, V]``, the same as :func:`linear_attn.step` on each row's state (``inv_freq``:
    as there, for a retained cache). ``rows`` is updated in place (and returned)."""
    B, H, K = q.shape
    Hkv = k.shape[1]
    q, fq = q.view(B, Hkv, H // Hkv, K), fq.view(B, Hkv, H // Hkv, -1)
    S, z, pos = rows.S[:B], rows.z[:B], rows.pos[:B]
    if not ring_size(spec):
        # Pure linear attention: the token is global to itself (as in linear_attn.step).
        _add_outer(S, fk, v)
        z.add_(fk)
        o = alpha * linear_attn._global_readout(spec, fq, S, z)
        if spec.decay < 1:
            S.mul_(spec.decay)
            z.mul_(spec.decay)
        pos.add_(1)
        return o.reshape(B, H, -1), rows
    # 1. the token joins its row's ring (its slot is empty)
    b = torch.arange(B, device=q.device)
    slot = ring_slot(spec, pos)
    rows.k[b, :, slot], rows.fk[b, :, slot], rows.v[b, :, slot] = k, fk, v
    rows.times[b, slot] = pos
    # 2. attend: every valid slot is local; the rest of the past is in S, z
    if q_sink is not None:
        q_sink = q_sink.view(B, Hkv, H // Hkv, K)
    # Until every row's ring has wrapped, the slots past the furthest row's newest token are
    # empty in every row: read up to it (a wide window of 8,188 slots, 600 tokens into a chat,
    # is read 600 slots deep, not 8,192).
    n = ring_reach(spec, pos)
    valid = rows.times[:B, :n] >= 0
    if spec.retain:
        rows.score[b, :, slot] = 0
        num, den = _retained_readout(spec, q, rows, B, n, q_sink, valid)
    else:
        num, den = linear_attn._local_readout(
            spec, q, rows.k[:B, :, :n], rows.v[:B, :, :n], q_sink, spec.sinks, valid
        )
    o = linear_attn._combine(spec, num, den, fq, S, z, alpha)
    # 3. the token at τ + 1 − size leaves the window
    _leave_window(spec, rows, b, inv_freq)
    pos.add_(1)
    return o.reshape(B, H, -1), rows


def _retained_readout(
    spec: LinearAttnSpec,
    q: Tensor,
    rows: LinearAttnRows,
    B: int,
    n: int,
    q_sink: Tensor | None,
    valid: Tensor,
) -> tuple[Tensor, Tensor]:
    """The window's softmax (its first ``n`` slots) with each row's retained cache in its
    denominator (weighed ``e^{s−m}``, ``m`` the window's largest score) as
    ``linear_attn._step_retained_readout``; adds the window's probabilities (summed over the
    query heads; sinks score nothing) to the slots' scores."""
    scores = linear_attn._window_scores(
        q, rows.k[:B, :, :n], q_sink, spec.sinks, valid[:, None, None, :], None
    )
    m = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - m)
    den = weights.sum(-1)
    num = torch.matmul(weights, rows.v[:B, :, :n])
    far_num, far_den = linear_attn.cache_readout(
        q, q_sink, rows.rk[:B], rows.rv[:B], rows.rtimes[:B], m
    )
    attention = (weights / den[..., None]).sum(2) * (rows.times[:B, :n] >= spec.sinks)[:, None]
    rows.score[:B, :, :n] += attention
    return num + far_num, den + far_den


def _leave_window(
    spec: LinearAttnSpec, rows: LinearAttnRows, b: Tensor, inv_freq: Tensor | None
) -> None:
    """Rows ``b`` (``[B]``, at time ``τ = pos``): the token at ``τ + 1 − size`` (unless a sink)
    folds into ``S, z`` (and competes for the retained cache) and its slot empties; ``S, z``
    age by one step."""
    S, z, pos = rows.S[: len(b)], rows.z[: len(b)], rows.pos[: len(b)]
    leaving = pos + 1 - spec.size
    gone = leaving >= spec.sinks
    out = ring_slot(spec, leaving.clamp_min(spec.sinks))
    if spec.retain:
        _retain(spec, rows, b, out, leaving, gone, inv_freq)
    if spec.use_global:
        # It is ``size`` tokens before the next one: it joins S, z aged decay^size.
        f = rows.fk[b, :, out] * (gone.to(S.dtype) * spec.decay**spec.size)[:, None, None]
        _add_outer(S, f, rows.v[b, :, out], decay=spec.decay)
        z.mul_(spec.decay).add_(f)
    rows.times[b, out] = torch.where(gone, -1, rows.times[b, out])


def _retain(
    spec: LinearAttnSpec,
    rows: LinearAttnRows,
    b: Tensor,
    out: Tensor,
    leaving: Tensor,
    gone: Tensor,
    inv_freq: Tensor | None,
) -> None:
    """The tokens leaving rows ``b`` (slots ``out``, times ``leaving``; where ``gone``), their
    scores now final, each take the place of their row's lowest (priority, time) cache entry
    when they rank above it (a later token wins ties): each row keeps the best ``M`` of
    everything that left, as ``retain.merge``."""
    final = rows.score[b, :, out]  # [B, Hkv]
    priority = retain.priority(final, leaving[:, None], spec.retain_halflife)  # each row's time
    rscore, rtimes = rows.rscore[: len(b)], rows.rtimes[: len(b)]
    lowest = rscore.min(-1).values
    latest = torch.iinfo(rtimes.dtype).max
    evict = torch.where(rscore == lowest[..., None], rtimes, latest).argmin(-1)
    row, head = ((priority >= lowest) & gone[:, None]).nonzero(as_tuple=True)
    if not len(row):
        return
    key = retain.unrotate(rows.k[b[row], head, out[row]], leaving[row], inv_freq)  # [n, K]
    entry = evict[row, head]
    rows.rk[row, head, entry] = key
    rows.rv[row, head, entry] = rows.v[b[row], head, out[row]]
    rows.rtimes[row, head, entry] = leaving[row]
    rows.rscore[row, head, entry] = priority[row, head]


def _add_outer(S: Tensor, f: Tensor, v: Tensor, decay: float = 1.0) -> None:
    """``S ← decay·S + f vᵀ`` in one pass, in place: ``S: [B, Hkv, F, V]``, ``f: [B, Hkv, F]``,
    ``v: [B, Hkv, V]``."""
    Fdim, V = S.shape[-2:]
    S.view(-1, Fdim, V).baddbmm_(f.reshape(-1, Fdim, 1), v.reshape(-1, 1, V), beta=decay)


def step_rows_reference(
    spec: LinearAttnSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    rows: LinearAttnRows,
    alpha: Tensor | float = 1.0,
    *,
    q_sink: Tensor | None = None,
    inv_freq: Tensor | None = None,
) -> tuple[Tensor, LinearAttnRows]:
    """:func:`step_rows` the plain way: each row read out, stepped with ``linear_attn.step``,
    written back. The reference it is tested against."""
    outputs = []
    for i in range(q.shape[0]):
        row = slice(i, i + 1)
        sink = None if q_sink is None else q_sink[row]
        state = read_row(spec, rows, i)
        token = (x[row] for x in (q, k, v, fq, fk))
        o, state = linear_attn.step(spec, *token, state, alpha, q_sink=sink, inv_freq=inv_freq)
        write_row(spec, rows, i, state)
        outputs.append(o)
    return torch.cat(outputs), rows
