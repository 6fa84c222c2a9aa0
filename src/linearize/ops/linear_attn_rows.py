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
(``size >= 2``, with or without sinks, softmax or relu2 locally, any global part) and pure linear
attention (no buffer); :func:`supports_rows` says which specs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops import linear_attn
from linearize.ops.linear_attn import LinearAttnSpec, LinearAttnState


@dataclass
class LinearAttnRows:
    """``R`` rows of one layer: ``S [R,Hkv,F,V]``, ``z [R,Hkv,F]``, ring buffers ``k [R,Hkv,C,K]``,
    ``fk [R,Hkv,C,F]``, ``v [R,Hkv,C,V]``, ``times [R,C]`` (−1: empty slot) and ``pos [R]``.
    A step of ``B`` rows uses rows ``0..B-1``."""

    S: Tensor
    z: Tensor
    k: Tensor
    fk: Tensor
    v: Tensor
    times: Tensor
    pos: Tensor

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.S, self.z, self.k, self.fk, self.v, self.times, self.pos)

    @property
    def capacity(self) -> int:
        """How many rows fit."""
        return self.S.shape[0]

    def row_nbytes(self) -> int:
        """Bytes of one row's state (fixed: it never depends on the row's position)."""
        return sum(t[0].numel() * t.element_size() for t in self._tensors())


def supports_rows(spec: LinearAttnSpec) -> bool:
    """Whether :func:`step_rows` covers ``spec``: sliding windows of ``size >= 2`` with a local
    kernel, or pure linear attention, without a retained cache (the others decode row by row
    with ``linear_attn.recurrent``)."""
    if spec.window != "sliding" or spec.retain:
        return False
    if spec.capacity == 0:
        return spec.local == "none"
    return spec.size >= 2 and spec.local != "none"


def ring_size(spec: LinearAttnSpec) -> int:
    """Slots per row: the sinks and one window (one more than ``spec.capacity``, so the new
    token is written before it attends)."""
    return 0 if spec.capacity == 0 else spec.sinks + spec.size


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
    return LinearAttnRows(
        S=torch.zeros(R, Hkv, feature_dim, value_dim, **zeros),
        z=torch.zeros(R, Hkv, feature_dim, **zeros),
        k=torch.zeros(R, Hkv, C, key_dim, **zeros),
        fk=torch.zeros(R, Hkv, C, feature_dim, **zeros),
        v=torch.zeros(R, Hkv, C, value_dim, **zeros),
        times=torch.full((R, C), -1, dtype=torch.long, device=device),
        pos=torch.zeros(R, dtype=torch.long, device=device),
    )


def resize_rows(rows: LinearAttnRows, capacity: int) -> LinearAttnRows:
    """New rows of ``capacity`` holding the first ``min(capacity, rows.capacity)`` rows."""
    n = min(capacity, rows.capacity)
    out = []
    for t in rows._tensors():
        new = t.new_full((capacity, *t.shape[1:]), -1 if t is rows.times else 0)
        new[:n] = t[:n]
        out.append(new)
    return LinearAttnRows(*out)


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
    return LinearAttnState(S, z, k, fk, v, F.pad(times[slots], (0, C - n), value=-1), n, pos)


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
) -> tuple[Tensor, LinearAttnRows]:
    """One decoding step of rows ``0..B-1``, each at its own position: ``q: [B, H, K]``,
    ``k: [B, Hkv, K]``, ``v: [B, Hkv, V]``, ``fq: [B, H, F]``, ``fk: [B, Hkv, F]`` →
    ``o: [B, H, V]``, the same as :func:`linear_attn.step` on each row's state. ``rows`` is
    updated in place (and returned)."""
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
    valid = rows.times[:B] >= 0
    num, den = linear_attn._local_readout(
        spec, q, rows.k[:B], rows.v[:B], q_sink, spec.sinks, valid
    )
    o = linear_attn._combine(spec, num, den, fq, S, z, alpha)
    # 3. the token at τ + 1 − size leaves the window
    _leave_window(spec, rows, b)
    pos.add_(1)
    return o.reshape(B, H, -1), rows


def _leave_window(spec: LinearAttnSpec, rows: LinearAttnRows, b: Tensor) -> None:
    """Rows ``b`` (``[B]``, at time ``τ = pos``): the token at ``τ + 1 − size`` (unless a sink)
    folds into ``S, z`` and its slot empties; ``S, z`` age by one step."""
    S, z, pos = rows.S[: len(b)], rows.z[: len(b)], rows.pos[: len(b)]
    leaving = pos + 1 - spec.size
    gone = leaving >= spec.sinks
    out = ring_slot(spec, leaving.clamp_min(spec.sinks))
    if spec.use_global:
        # It is ``size`` tokens before the next one: it joins S, z aged decay^size.
        f = rows.fk[b, :, out] * (gone.to(S.dtype) * spec.decay**spec.size)[:, None, None]
        _add_outer(S, f, rows.v[b, :, out], decay=spec.decay)
        z.mul_(spec.decay).add_(f)
    rows.times[b, out] = torch.where(gone, -1, rows.times[b, out])


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
) -> tuple[Tensor, LinearAttnRows]:
    """:func:`step_rows` the plain way: each row read out, stepped with ``linear_attn.step``,
    written back. The reference it is tested against."""
    outputs = []
    for i in range(q.shape[0]):
        row = slice(i, i + 1)
        sink = None if q_sink is None else q_sink[row]
        state = read_row(spec, rows, i)
        token = (x[row] for x in (q, k, v, fq, fk))
        o, state = linear_attn.step(spec, *token, state, alpha, q_sink=sink)
        write_row(spec, rows, i, state)
        outputs.append(o)
    return torch.cat(outputs), rows
