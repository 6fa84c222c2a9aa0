"""The host side of the fixed-shape state: ring buffers, their ``times``, and the control tensors.

One :class:`RingState` holds every state tensor a :class:`~linearize.engine.step.FixedStep`
reads, as numpy arrays the engine binds without copying. Before a step, :meth:`prepare` fills the
control tensors of each layout from its spec (which slots the query sees, which tokens leave for
``S, z``); after it, :meth:`commit` writes the new token's key/value rows into a free slot.

With a retained cache (``spec.retain = M``) the ``M`` slots after the sinks hold it; when a
token leaves the window :meth:`commit` reads its final in-window attention from the step's
``score`` output and lets it replace the cache's lowest entry where it ranks above it.

A ring is filled from its first slot, so while a context is shorter than a ring only a prefix of
it holds tokens. ``reach`` bounds the slots a state holds per ring (its arrays are that long);
the engine starts short and moves to a longer reach (:meth:`RingState.grown`) as the context
grows, so a step reads the filled part of a wide ring (or of a softmax cache), not all of it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from linearize.engine.step import KV_GROUP, Layout, kv_codes, kv_values, state_inputs, state_outputs
from linearize.models.decoder import ModelState
from linearize.ops import retain

# The step's inputs that are a layout's control tensors (shared by its layers), not state.
CONTROLS = (
    "mask",
    "fold_index",
    "fold_weight",
    "fold_new",
    "sink_rotation",
    "inwindow",
    "window_mask",
)
# The ring buffers, one slot per kept token.
RINGS = ("k", "v", "fk")
# The scales of an int8 ring's keys and values (Layout.kv_type), a row of them per slot.
SCALES = ("k_scale", "v_scale")
# The state arrays with one entry per ring slot on axis 2 (they follow the reach).
SLOTTED = (*RINGS, *SCALES, "score")
# ``times`` of a free slot, and of the retained cache's slots (never free, never local).
EMPTY, RETAINED = -1, -2
LATEST = np.iinfo(np.int64).max


class _Control:
    """The control tensors and slot bookkeeping shared by every layer of one layout.

    ``array(kind, shape, dtype)`` makes the arrays the step reads per row (``[rows, *shape]``,
    zeros; a row of a batch's for a batch's row): ``arrays`` holds them as bound, the attributes
    (``mask``, ...) are this row's part, ``shape``-shaped."""

    def __init__(self, lay: Layout, size: int, array, row: int = 0) -> None:
        self.lay = lay
        self.size = C = size
        self.times = np.full(C, EMPTY, dtype=np.int64)
        if lay.retained and lay.front > C:
            raise AssertionError(f"a ring of {C} slots cannot hold its first {lay.front}")
        self.times[lay.spec.sinks : lay.front] = RETAINED
        # Which slots the query sees: added to softmax scores (0 or −inf), else multiplied (1 / 0).
        self.additive = lay.spec.local == "softmax"
        K = lay.key_dim
        self.arrays = {
            "mask": array("mask", (C,), np.float32),
            # Each key head's leaving slots as rows of the rings flattened to [rows·Hkv·C, ·].
            "fold_index": array("fold_index", (lay.kv_heads * lay.folds,), np.int64),
            "fold_weight": array("fold_weight", (lay.folds,), np.float32),
            "fold_new": array("fold_new", (1,), np.float32),
            # The sink query's rotation (sinks at cache positions), filled by the engine.
            "sink_rotation": array("sink_rotation", (K, K), np.float32),
        }
        self.mask, self.fold_index, self.fold_weight, self.fold_new, self.sink_rotation = (
            x[0] for x in self.arrays.values()
        )
        # By key head; the first head's (of row 0: the slots themselves) are what the
        # one-sequence step reads (engine.step.FixedStep).
        self._fold_heads = self.fold_index.reshape(lay.kv_heads, lay.folds)
        self.fold_slots = self._fold_heads[0]
        self.sink_rotation[...] = np.eye(K, dtype=np.float32)
        self.sink_position = -1
        # Where each key head's slots start in the rings flattened (this row of its batch's).
        H = lay.kv_heads
        self.heads = (row * H + np.arange(H, dtype=np.int64)[:, None]) * C
        # The slots whose softmax weights count as the window's (all but the retained).
        self.inwindow = np.ones((C + 1, 1), dtype=np.float32)
        self.inwindow[lay.spec.sinks : lay.front] = 0
        self.window_mask = np.where(self.inwindow[:, 0] > 0, 0, -np.inf).astype(np.float32)
        self.slot = -1
        self.new_leaves = False

    def prepare(self, pos: int) -> None:
        lay, C = self.lay, self.size
        candidates = np.append(self.times, pos)
        valid = candidates >= 0
        # Local to this query (pos) and to the next one (pos + 1): what stays in the ring.
        local = lay.spec.is_local(candidates, np.array([pos, pos + 1]))
        keep = valid & local[1]
        fold = valid & ~keep
        seen = valid[:C] & local[0, :C]
        if self.additive:
            self.mask[:] = np.where(seen, 0, -np.inf)
        else:
            self.mask[:] = seen
        # Tokens leaving the window free their slots; without a global part they are dropped.
        self.leaving = leaving = np.flatnonzero(fold[:C])
        if lay.use_global:
            if len(leaving) > lay.folds:
                raise AssertionError(
                    f"{len(leaving)} tokens leave at once; the graph folds {lay.folds}"
                )
            # A token joins S, z aged to the next token's time: decay^(pos + 1 - time).
            decay = lay.spec.decay
            self.fold_weight[:] = 0
            self.fold_weight[: len(leaving)] = decay ** (pos + 1 - self.times[leaving])
            # Each head's offset, plus the slot where a token leaves (padding: the offset).
            self._fold_heads[:] = self.heads
            self._fold_heads[:, : len(leaving)] += leaving
            self.fold_new[0] = decay * float(fold[C])
        self.new_leaves = bool(fold[C])
        self.slot = -1
        if C and bool(keep[C]):
            free = np.flatnonzero((self.times == EMPTY) | fold[:C])
            if not len(free) and lay.capacity > C:
                raise AssertionError(f"position {pos} is past the state's reach ({C} slots)")
            if not len(free):
                raise ValueError(
                    f"context {pos + 1} is past the engine's max context ({C} cached tokens): "
                    "rebuild the engine with a larger max_context"
                )
            self.slot = int(free[0])
            # The step scores the sinks as the ring's first slots (they never leave).
            assert self.slot >= lay.front or self.slot == pos, (self.slot, pos)

    def commit(self, pos: int) -> None:
        self.times[self.leaving] = EMPTY
        if self.slot >= 0:
            self.times[self.slot] = pos


class _Retained:
    """The retained caches (:mod:`~linearize.ops.retain`) of the layers that share one layout,
    stacked, so that a token leaving the window joins all of them in a few array operations.

    Each cache lives in its layer's rings, in the ``M`` slots after the sinks (the step reads
    them with the window); here are the rings ``k, v, fk: [L, 1, Hkv, C, ·]`` (each layer's are
    views of them), the entries' times and priorities ``[L, 1, Hkv, M]`` (host only; the tree
    pass reads the layers' rows) and the slots' in-window attention in two stacks ``[L, 1, Hkv,
    C + 1]`` (the step's input and output, trading places as ``S, z`` do; the last entry is the
    new token's own). A cache is in no particular order: a leaving token replaces the lowest
    (priority, time) entry when it ranks above it, which keeps the best ``M`` of everything that
    left, as :func:`retain.merge` does."""

    def __init__(self, lay: Layout, size: int) -> None:
        self.lay, self.size = lay, size
        self.layers: list[int] = []

    def allocate(self, array) -> None:
        """``array(kind, shape)``: the stack of ``kind`` with the rows on axis 1 (the step
        reads them; a row of a batch's for a batch's row)."""
        lay, L, C = self.lay, len(self.layers), self.size
        Hkv, M, K = lay.kv_heads, lay.retained, lay.key_dim
        self.k = array("k", (L, Hkv, C, K), ring_dtype(lay, "k"))
        self.v = array("v", (L, Hkv, C, K), ring_dtype(lay, "v"))
        # An int8 ring's scales (else none).
        groups = K // KV_GROUP if lay.kv_type == "int8" else 0
        self.k_scale, self.v_scale = (array(x, (L, Hkv, C, groups)) for x in SCALES)
        features = lay.feature_dim if lay.use_global else 0  # no feature ring without S, z
        self.fk = array("fk", (L, Hkv, C, features))
        # The host's own (never read by the step).
        self.rtimes = np.full((L, 1, Hkv, M), EMPTY, dtype=np.int64)
        self.rscore = np.full((L, 1, Hkv, M), -np.inf, dtype=np.float32)
        self.scores = [array(f"scores{j}", (L, Hkv, C + 1)) for j in range(2)]

    def rows(self, i: int) -> dict[str, np.ndarray]:
        """Layer ``i``'s arrays, views of the stacks, by input / output kind."""
        j = self.layers.index(i)
        return {
            "k": self.k[j],
            "v": self.v[j],
            "k_scale": self.k_scale[j],
            "v_scale": self.v_scale[j],
            "fk": self.fk[j],
            "rtimes": self.rtimes[j],
            "rscore": self.rscore[j],
            "score": self.scores[0][j],
            "score_out": self.scores[1][j],
        }

    def mask(self, mask: np.ndarray) -> None:
        """The step's ``mask`` on the retained slots: 0 where filled, −inf where empty. Every
        layer and key head fills its cache in the same order (a token that left ranks above an
        empty entry), so one mask serves them all."""
        mask[self.lay.spec.sinks : self.lay.front] = np.where(self.rtimes[0, 0, 0] >= 0, 0, -np.inf)

    def merge(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        final: np.ndarray,
        time: int,
        inv_freq: np.ndarray | None,
    ) -> None:
        """The token at ``time`` left the window: ``keys, values: [L, Hkv, K]`` (keys rotated
        at ``time``, un-rotated here with the RoPE frequencies ``inv_freq: [K/2]``), ``final:
        [L, Hkv]`` its in-window attention."""
        halflife = self.lay.spec.retain_halflife
        priority = final
        if halflife:  # retain.priority, in float32
            with np.errstate(divide="ignore"):
                priority = np.log2(final) + np.float32(time) / np.float32(halflife)
        rscore, rtimes = self.rscore[:, 0], self.rtimes[:, 0]  # [L, Hkv, M]
        lowest = rscore.min(-1)
        # The lowest entry: the earliest among equal priorities (empty entries first).
        evict = np.where(rscore == lowest[..., None], rtimes, LATEST).argmin(-1)
        layer, head = np.nonzero(priority >= lowest)  # a later token wins a tie
        if not len(layer):
            return
        keys = keys[layer, head]
        if inv_freq is not None:  # retain.unrotate, in numpy (one token: no torch call)
            angles = np.float32(time) * inv_freq
            cos, sin = np.cos(angles), np.sin(angles)
            half = keys.shape[-1] // 2
            first, second = keys[..., :half], keys[..., half:]
            keys = np.concatenate([first * cos + second * sin, second * cos - first * sin], -1)
        entry = evict[layer, head]
        slot = self.lay.spec.sinks + entry
        put_rows(self.k, self.k_scale, (layer, 0, head, slot), keys)
        put_rows(self.v, self.v_scale, (layer, 0, head, slot), values[layer, head])
        self.rtimes[layer, 0, head, entry] = time
        self.rscore[layer, 0, head, entry] = priority[layer, head]

    def ranked(self, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer ``i``'s cache as a PyTorch state holds it (``rk, rv, rtimes, rscore``, in
        decreasing (score, time) order, as ``retain.merge`` leaves it): :meth:`load` undone."""
        j = self.layers.index(i)
        front = slice(self.lay.spec.sinks, self.lay.front)
        rtimes = torch.from_numpy(self.rtimes[j].copy())
        rscore = _tensor(self.rscore[j], dtype)
        order = retain.ranking(rtimes, rscore)
        index = order[..., None]
        rk, rv = (
            _tensor(rows_of(x, scales, (j, slice(None), slice(None), front)), dtype)
            for x, scales in ((self.k, self.k_scale), (self.v, self.v_scale))
        )
        return {
            "rk": rk.gather(2, index.expand_as(rk)),
            "rv": rv.gather(2, index.expand_as(rv)),
            "rtimes": rtimes.gather(-1, order),
            "rscore": rscore.gather(-1, order),
        }

    def load(self, i: int, attn) -> None:
        """Take over layer ``i``'s cache from a PyTorch state (its slots' scores are placed
        with the window's tokens)."""
        j = self.layers.index(i)
        front = (j, slice(None), slice(None), slice(self.lay.spec.sinks, self.lay.front))
        put_rows(self.k, self.k_scale, front, attn.rk.float().numpy())
        put_rows(self.v, self.v_scale, front, attn.rv.float().numpy())
        self.rtimes[j] = attn.rtimes.numpy()
        self.rscore[j] = attn.rscore.float().numpy()


class RingState:
    """All state tensors of a fixed-shape step and the position; each ring holds ``min(capacity,
    reach)`` slots (``reach=None``: its whole capacity). ``inv_freq``: the RoPE frequencies that
    store retained keys un-rotated (layers with sinks at cache positions).

    One sequence's state (every array with one row, axis 0), or, with ``rows=n``, the arrays of
    ``n`` sequences stepped together (:class:`RingRows`), whose row ``i`` is the state
    ``RingState(..., of=(batch, i))``: every array of it a view of the batch's."""

    def __init__(
        self,
        layouts: list[Layout],
        reach: int | None = None,
        inv_freq: torch.Tensor | None = None,
        *,
        rows: int = 1,
        of: tuple[RingState, int] | None = None,
    ) -> None:
        self.layouts = layouts
        self.reach = reach
        self.inv_freq = inv_freq
        self.rows = 1 if of is not None else rows
        self.of = of
        # Every array the step reads or writes, by a name of its own (a batch's row finds its
        # part of the batch's arrays by these names).
        self.arrays: dict[str, np.ndarray] = {}
        # An engine's I/O bindings of these arrays, by session, and of the state's own input /
        # output buffers (the token's embedding, its rotation, the logits); the RoPE tables of
        # its positions (OnnxEngine._bindings, _tables).
        self.bindings: dict[object, list] = {}
        self.io: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._table = None
        self._frequencies = None if inv_freq is None else inv_freq.float().numpy()
        self.controls: dict[tuple, _Control] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        # Every ring (k, v, fk), its slots on axis 2: [1, Hkv, C, ·]; an int8 ring's scales
        # by the ring's name (read and written with it: put_rows, rows_of).
        self.rings: dict[str, np.ndarray] = {}
        self.scales: dict[str, np.ndarray] = {}
        # The control inputs as the one-sequence step reads them (without the row axis).
        self.one_row: dict[str, np.ndarray] = {}
        self.pos = 0
        sizes = [lay.capacity if reach is None else min(lay.capacity, reach) for lay in layouts]
        keys = list(dict.fromkeys(lay.key for lay in layouts))
        # The retained caches, stacked per layout; each layer's arrays are rows of its stack.
        self.retained: dict[tuple, _Retained] = {}
        for i, (lay, size) in enumerate(zip(layouts, sizes, strict=True)):
            if lay.retained:
                self.retained.setdefault(lay.key, _Retained(lay, size)).layers.append(i)
        for key, kept in self.retained.items():
            kept.allocate(self._maker(f"retained{keys.index(key)}", axis=1))
        for i, (lay, size) in enumerate(zip(layouts, sizes, strict=True)):
            if lay.key not in self.controls:
                row = 0 if of is None else of[1]
                maker = self._maker(keys.index(lay.key))
                self.controls[lay.key] = _Control(lay, size, maker, row)
            control = self.controls[lay.key]
            shapes = _shapes(lay, size)
            rows = self.retained[lay.key].rows(i) if lay.retained else {}
            for name in state_inputs(i, lay):
                kind = name.split(".")[0]
                if kind in control.arrays:
                    self.inputs[name] = control.arrays[kind]
                    self.one_row[name] = getattr(
                        control, "fold_slots" if kind == "fold_index" else kind
                    )
                elif kind in CONTROLS:  # the same for every row
                    self.inputs[name] = getattr(control, kind)
                elif kind in rows:
                    self.inputs[name] = rows[kind]
                else:
                    self.inputs[name] = self._array(name, shapes[kind][1:], ring_dtype(lay, kind))
                if kind in RINGS:
                    self.rings[name] = self.inputs[name]
                if kind in SCALES:
                    self.scales[f"{kind[0]}.{i}"] = self.inputs[name]
            for name in state_outputs(i, lay):
                kind = name.split(".")[0]
                if kind in rows:
                    self.outputs[name] = rows[kind]
                else:
                    self.outputs[name] = self._array(name, shapes[kind][1:])
        # What commit does per step, resolved once: (control, output, ring) row writes, and
        # the (input, output) names of S, z, the conv tails and the retained scores, whose
        # buffers trade places (ping-pong: the step's outputs become the next step's inputs
        # without a copy; the engine binds both arrangements once, ``parity`` says which one is
        # current).
        self._rows: list[tuple[_Control, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._swaps: list[tuple[str, str]] = []
        self.parity = 0
        for i, lay in enumerate(layouts):
            for name in state_outputs(i, lay):
                kind = name.split(".")[0]
                if kind.startswith("new_"):
                    ring = f"{kind[4:]}.{i}"
                    self._rows.append(
                        (
                            self.controls[lay.key],
                            self.outputs[name],
                            self.rings[ring],
                            self.scales.get(ring),
                        )
                    )
                else:
                    self._swaps.append((f"{kind.split('_')[0]}.{i}", name))
        if of is not None:  # (in the batch's first arrangement: RingRows keeps the parity)
            batch, row = of
            if batch.io is not None:
                self.io = tuple(x[row : row + 1] for x in batch.io)

    def _array(
        self, name: str, shape: tuple[int, ...], dtype=np.float32, axis: int = 0
    ) -> np.ndarray:
        """The array ``name``: ``shape`` with the rows inserted at ``axis``, zeros (a row of a
        batch's: a view of it)."""
        if self.of is not None:
            batch, row = self.of
            index = (slice(None),) * axis + (slice(row, row + 1),)
            array = batch.arrays[name][index]
        else:
            array = np.zeros((*shape[:axis], self.rows, *shape[axis:]), dtype=dtype)
        self.arrays[name] = array
        return array

    def _maker(self, group: object, axis: int = 0):
        """``array(kind, shape, dtype=float32)``: :meth:`_array` named ``{kind}@{group}``."""

        def array(kind: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
            return self._array(f"{kind}@{group}", shape, dtype, axis)

        return array

    def make_io(self, hidden: int, rotation: int, vocab: int) -> None:
        """The step's own inputs and output (the tokens' embeddings ``[rows, 1, hidden]``,
        their rotations ``[rows, rotation, rotation]``, the logits ``[rows, vocab]``), once."""
        if self.io is not None:
            return
        if self.of is not None:
            raise AssertionError("a batch's row takes its I/O buffers from the batch")
        self.io = (
            np.zeros((self.rows, 1, hidden), dtype=np.float32),
            np.repeat(np.eye(rotation, dtype=np.float32)[None], self.rows, 0),
            np.zeros((self.rows, vocab), dtype=np.float32),
        )

    def nbytes(self) -> int:
        """Bytes of the state at its full reach (what it grows to and never passes): ring
        buffers and their times, S, z, conv tails."""
        return self._bytes(None)

    def read_bytes(self, slots: int) -> int:
        """Bytes of the state a step reads once its rings hold ``slots`` filled slots: of each
        ring's keys and values its first ``min(capacity, slots)`` (the window kernel reads no
        further), of its key features the rows folded into S, z (``Layout.folds``); S, z and
        conv tails whole."""
        return self._bytes(slots)

    def _bytes(self, slots: int | None) -> int:
        """:meth:`nbytes`, or with ``slots`` :meth:`read_bytes`."""
        kinds = (*RINGS, *SCALES, "S", "z", "conv", "score")
        total = 0
        for i, lay in enumerate(self.layouts):
            size = lay.capacity if slots is None else min(lay.capacity, slots)
            shapes = _shapes(lay, size)
            if slots is not None:
                shapes["fk"] = _shapes(lay, min(size, lay.folds))["fk"]
            parts = [name.split(".")[0] for name in state_inputs(i, lay)]
            total += sum(
                ring_dtype(lay, kind).itemsize * math.prod(shapes[kind])
                for kind in parts
                if kind in kinds
            )
            total += 8 * size  # times (int64)
            # The retained cache's times (int64) and priorities (float32).
            total += (8 + 4) * lay.kv_heads * lay.retained
        return total

    def held_bytes(self) -> int:
        """Bytes this state's arrays hold now, at its current reach (:meth:`nbytes`: what it
        grows to): every input and output, the retained caches' stacks, its I/O buffers (a
        batch's row: its share of the batch's)."""
        if self.of is not None:
            batch = self.of[0]
            return batch.held_bytes() // batch.rows
        arrays = [*self.inputs.values(), *self.outputs.values(), *(self.io or ())]
        for kept in self.retained.values():
            arrays += [kept.k, kept.v, kept.k_scale, kept.v_scale, kept.fk]
            arrays += [kept.rtimes, kept.rscore, *kept.scores]
        seen, total = set(), 0
        for array in arrays:
            base = array if array.base is None else array.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
        return total

    def grown(self, reach: int | None) -> RingState:
        """A state holding this one's tokens with a longer ``reach`` (a ring's filled slots
        are kept in place; the slots beyond are empty)."""
        if reach is not None and self.reach is not None and reach < self.reach:
            raise ValueError(f"a state grows; reach {reach} < {self.reach}")
        new = RingState(self.layouts, reach, self.inv_freq)
        self.copy_into(new)
        return new

    def copy_into(self, new: RingState) -> None:
        """Put this state's tokens into ``new`` (a state of the same layouts, its rings at
        least as long: a filled slot keeps its place), whatever ``new`` held: its slots past
        this state's keep their numbers, which no step reads (their times say empty, so the
        mask hides them; nothing folds from them) and a token taking one overwrites."""
        for name, array in self.inputs.items():
            kind = name.split(".")[0]
            if kind in SLOTTED:
                n = array.shape[2] - (kind == "score")  # a score's last entry is scratch
                target = new.inputs[name]
                if target.shape[2] < array.shape[2]:
                    raise ValueError(f"{name}: {array.shape[2]} slots into {target.shape[2]}")
                target[:, :, :n] = array[:, :, :n]
            elif kind not in CONTROLS:
                np.copyto(new.inputs[name], array)
        for key, control in self.controls.items():
            new.controls[key].times[:] = EMPTY
            new.controls[key].times[: control.size] = control.times
            new.controls[key].sink_position = -1
        for key, kept in self.retained.items():
            np.copyto(new.retained[key].rtimes, kept.rtimes)
            np.copyto(new.retained[key].rscore, kept.rscore)
        new.pos = self.pos

    def prepare(self) -> None:
        for control in self.controls.values():
            control.prepare(self.pos)
        for key, kept in self.retained.items():
            kept.mask(self.controls[key].mask)

    def swap(self) -> None:
        """The S / z / tail outputs become the inputs (and the old inputs the next outputs)."""
        inputs, outputs = self.inputs, self.outputs
        for i, o in self._swaps:
            inputs[i], outputs[o] = outputs[o], inputs[i]
        self.parity ^= 1

    def commit(self) -> None:
        """After a step: the tokens that leave the window into the retained caches, new rows
        into their slots, S/z/tails/scores from the outputs, times."""
        for key, kept in self.retained.items():
            control = self.controls[key]
            scores = kept.scores[1 - self.parity][:, 0]  # the step's output, [L, Hkv, C + 1]
            own = scores[..., -1]
            for slot in control.leaving:
                self._retain(kept, control, scores[..., slot], slot)
            if control.new_leaves:  # a group completed by this token: it leaves at once
                new = [np.stack([self.outputs[f"new_{x}.{i}"][0, :, 0] for i in kept.layers])
                       for x in ("k", "v")]  # fmt: skip
                kept.merge(*new, own, self.pos, self._inv_freq(kept))
            if control.slot >= 0:
                scores[..., control.slot] = own
            own[...] = 0
        for control, out, ring, scales in self._rows:
            if control.slot >= 0:
                put_rows(ring, scales, (slice(None), slice(None), control.slot), out[:, :, 0])
        self.swap()
        for control in self.controls.values():
            control.commit(self.pos)
        self.pos += 1

    def commit_tree(self, path: list[int], nodes: dict[str, np.ndarray]) -> None:
        """Append the accepted tree nodes ``path`` (root→node order), as decode steps would:
        fold what leaves the window into ``S, z``, write the rows, shift the conv tails.
        ``nodes``: the tree pass's ``node_k.i`` / ``node_v.i`` / ``node_fk.i`` ``[1, Hkv, N,
        ·]``; with a retained cache also ``node_attention.i`` ``[1, Hkv, N, C + N]``, each
        node's in-window attention on the ring's slots and on the nodes (as the tree pass saw
        the ring: a slot a node of the path took since holds a token no later node attends to).

        The slot schedule (which token leaves, where a node goes) and the retained caches walk
        the path node by node, per layout; each layer's rows, folds and tails are then written
        in a few array operations (:meth:`_commit_layer`), whatever the path's length."""
        # Per retained layout: the nodes' attention and rows stacked over its layers, and the
        # path's nodes now in the ring (node, slot), whose scores the later nodes add to.
        attention = {
            key: np.stack([nodes[f"node_attention.{i}"][0] for i in kept.layers])
            for key, kept in self.retained.items()
        }
        rows = {
            key: [np.stack([nodes[f"node_{x}.{i}"][0] for i in kept.layers]) for x in ("k", "v")]
            for key, kept in self.retained.items()
        }
        placed: dict[tuple, list[tuple[int, int]]] = {key: [] for key in self.retained}
        # Per layout: the node last put in each slot (the rings are written after the walk, so
        # a token that leaves from such a slot is read from the nodes), and what folds into
        # S, z: (step along the path, weight, slot it leaves, node it is or −1: the ring's).
        written: dict[tuple, dict[int, int]] = {key: {} for key in self.controls}
        folds: dict[tuple, list[tuple[int, float, int, int]]] = {key: [] for key in self.controls}
        for step, node in enumerate(path):
            for control in self.controls.values():
                control.prepare(self.pos)
            own = {}
            for key, kept in self.retained.items():
                control, seen = self.controls[key], attention[key][:, :, node]
                scores = kept.scores[self.parity][:, 0]  # the state's, updated in place
                C = scores.shape[-1] - 1
                scores[..., :C] += seen[..., :C]
                for earlier, slot in placed[key]:
                    scores[..., slot] += seen[..., C + earlier]
                for slot in control.leaving:
                    source = written[key].get(int(slot))
                    placed_rows = None if source is None else [x[:, :, source] for x in rows[key]]
                    self._retain(kept, control, scores[..., slot], slot, placed_rows)
                if control.new_leaves:  # a group completed by this node: it leaves at once
                    keys, values = (x[:, :, node] for x in rows[key])
                    kept.merge(keys, values, seen[..., C + node], self.pos, self._inv_freq(kept))
                gone = set(control.leaving.tolist())
                placed[key] = [(n, s) for n, s in placed[key] if s not in gone]
                if control.slot >= 0:
                    own[key] = seen[..., C + node]
                    placed[key].append((node, control.slot))
            for key, control in self.controls.items():
                if control.lay.use_global:
                    for slot, weight in zip(control.leaving, control.fold_weight, strict=False):
                        source = written[key].get(int(slot), -1)
                        folds[key].append((step, float(weight), int(slot), source))
                    if control.fold_new[0]:
                        folds[key].append((step, float(control.fold_new[0]), -1, node))
                if control.slot >= 0:
                    written[key][control.slot] = node
            for key, score in own.items():
                kept = self.retained[key]
                kept.scores[self.parity][:, 0, :, self.controls[key].slot] = score
            for control in self.controls.values():
                control.commit(self.pos)
            self.pos += 1
        for i, lay in enumerate(self.layouts):
            self._commit_layer(i, lay, path, nodes, written[lay.key], folds[lay.key])

    def _commit_layer(
        self,
        i: int,
        lay: Layout,
        path: list[int],
        nodes: dict[str, np.ndarray],
        written: dict[int, int],
        folds: list[tuple[int, float, int, int]],
    ) -> None:
        """Layer ``i``'s part of :meth:`commit_tree`: ``S, z`` aged over the path and the
        ``folds`` added (each aged from its step on: ``decay^(len(path) − 1 − step)``), the
        nodes' rows into the slots ``written`` (slot → node), the conv tail shifted by the
        path's values."""
        if lay.use_global:
            S, z = self.inputs[f"S.{i}"], self.inputs[f"z.{i}"]
            decay = lay.spec.decay
            if decay < 1:
                S *= np.float32(decay ** len(path))
                z *= np.float32(decay ** len(path))
            if folds:
                step, weight, slot, source = (np.array(x) for x in zip(*folds, strict=True))
                weight = (weight * decay ** (len(path) - 1 - step)).astype(np.float32)
                fk, v = (self._folded(i, x, slot, source, nodes) for x in ("fk", "v"))
                fk = fk * weight[:, None, None]
                S += np.matmul(fk.transpose(1, 2, 0), v.transpose(1, 0, 2))[None]
                z += fk.sum(0)[None]
        if written:
            slots, sources = np.array(list(written)), np.array(list(written.values()))
            for x in ("k", "v", "fk") if lay.use_global else ("k", "v"):
                name = f"{x}.{i}"
                rows = nodes[f"node_{x}.{i}"][:, :, sources]
                put_rows(
                    self.rings[name], self.scales.get(name), (slice(None), slice(None), slots), rows
                )
        if lay.conv_taps:
            tail = self.inputs[f"conv.{i}"]
            if tail.shape[2]:
                values = nodes[f"node_v.{i}"][:, :, path]
                tail[...] = np.concatenate([tail, values], 2)[:, :, -tail.shape[2] :]

    def _folded(
        self, i: int, x: str, slot: np.ndarray, source: np.ndarray, nodes: dict[str, np.ndarray]
    ) -> np.ndarray:
        """Layer ``i``'s ``x`` rows (``fk`` or ``v``) of the tokens that fold, ``[folds, Hkv,
        ·]``: from the ring's ``slot`` where ``source`` is −1, else from node ``source``."""
        node_rows = nodes[f"node_{x}.{i}"][0]  # [Hkv, N, ·]
        rows = np.empty((len(slot), *node_rows[:, 0].shape), dtype=node_rows.dtype)
        ring = source < 0
        if ring.any():
            name = f"{x}.{i}"
            scales = self.scales.get(name)
            scales = None if scales is None else scales[0]
            kept = rows_of(self.rings[name][0], scales, (slice(None), slot[ring]))  # [Hkv, n, ·]
            rows[ring] = kept.transpose(1, 0, 2)
        if not ring.all():
            rows[~ring] = node_rows[:, source[~ring]].transpose(1, 0, 2)
        return rows

    def _retain(
        self,
        kept: _Retained,
        control: _Control,
        final: np.ndarray,
        slot: int,
        rows: list[np.ndarray] | None = None,
    ) -> None:
        """The token in ``slot`` leaves the window with its in-window attention ``final: [L,
        Hkv]``: into the retained caches of ``kept``'s layers. Its keys and values are the
        ring's, or ``rows`` (``[L, Hkv, K]`` each) for a token a commit has not written yet."""
        where = (slice(None), 0, slice(None), slot)
        keys, values = rows or (
            rows_of(kept.k, kept.k_scale, where),
            rows_of(kept.v, kept.v_scale, where),
        )
        kept.merge(keys, values, final, int(control.times[slot]), self._inv_freq(kept))

    def _inv_freq(self, kept: _Retained) -> np.ndarray | None:
        """The frequencies that un-rotate ``kept``'s keys (``None``: kept rotated)."""
        return self._frequencies if kept.lay.cache_sinks else None

    def snapshot(self) -> dict:
        """A copy of everything a step changes (for :meth:`restore`, on a state of the same
        ``reach``): the state arrays and times; the control tensors are derived from those
        before every step."""
        arrays = {n: a.copy() for n, a in self.inputs.items() if n.split(".")[0] not in CONTROLS}
        times = {key: c.times.copy() for key, c in self.controls.items()}
        retained = {key: (k.rtimes.copy(), k.rscore.copy()) for key, k in self.retained.items()}
        return {
            "arrays": arrays,
            "times": times,
            "retained": retained,
            "pos": self.pos,
            "reach": self.reach,
        }

    def restore(self, snapshot: dict) -> None:
        if snapshot["reach"] != self.reach:
            raise ValueError(f"a snapshot of reach {snapshot['reach']} on a state of {self.reach}")
        for name, array in snapshot["arrays"].items():
            np.copyto(self.inputs[name], array)
        for key, times in snapshot["times"].items():
            np.copyto(self.controls[key].times, times)
        for key, (rtimes, rscore) in snapshot["retained"].items():
            np.copyto(self.retained[key].rtimes, rtimes)
            np.copyto(self.retained[key].rscore, rscore)
        self.pos = snapshot["pos"]

    def load(self, state: ModelState) -> None:
        """Take over a PyTorch decoding state (after a prefill by the reference model)."""
        for i, (lay, layer) in enumerate(zip(self.layouts, state.layers, strict=True)):
            attn = layer.attn
            control = self.controls[lay.key]
            if lay.capacity:
                if hasattr(attn, "S"):
                    k, fk, v, times = attn.kept()
                else:
                    k, v = attn.kept()
                    fk, times = None, torch.arange(attn.pos)
                n = k.shape[2]
                if n > lay.capacity - lay.retained:
                    raise ValueError(
                        f"the prompt holds {n} tokens, past the engine's max context "
                        f"({lay.capacity}): rebuild the engine with a larger max_context"
                    )
                # The sinks first, then the window's tokens, after the retained slots.
                slots = np.arange(n)
                slots[lay.spec.sinks :] += lay.retained
                if n and slots[-1] >= control.size:
                    raise AssertionError(f"{n} kept tokens past the state's reach ({control.size})")
                for kind, tensor in (("k", k), ("v", v), ("fk", fk)):
                    name = f"{kind}.{i}"
                    if name in self.rings:
                        self.rings[name][...] = 0
                        scales = self.scales.get(name)
                        if scales is not None:
                            scales[...] = 0
                        where = (slice(None), slice(None), slots)
                        put_rows(self.rings[name], scales, where, tensor.float().numpy())
                control.times[:] = EMPTY
                control.times[lay.spec.sinks : lay.front] = RETAINED
                control.times[slots] = times.numpy()
            if lay.retained:
                score = self.inputs[f"score.{i}"]
                score[...] = 0
                score[:, :, slots] = attn.score[:, :, :n].float().numpy()
                self.retained[lay.key].load(i, attn)
            if lay.use_global:
                self.inputs[f"S.{i}"][...] = attn.S.float().numpy()
                self.inputs[f"z.{i}"][...] = attn.z.float().numpy()
            if lay.conv_taps:
                self.inputs[f"conv.{i}"][...] = layer.conv.float().numpy()
        self.pos = state.pos

    def to_state(self, fresh: ModelState) -> ModelState:
        """This state as a PyTorch decoding state, the inverse of :meth:`load`: ``fresh`` is an
        empty state of the same model (``Decoder.init_state(1)``), filled and returned (each
        window's tokens in time order, the retained caches ranked as ``retain.merge`` leaves
        them)."""
        layers = []
        for i, (lay, layer) in enumerate(zip(self.layouts, fresh.layers, strict=True)):
            attn, conv = layer.attn, layer.conv
            dtype = (attn.S if hasattr(attn, "S") else attn.k).dtype
            changed: dict = {"pos": self.pos}
            if lay.capacity:
                times = self.controls[lay.key].times
                slots = np.flatnonzero(times >= 0)
                slots = slots[np.argsort(times[slots], kind="stable")]
                n = len(slots)
                for kind in ("k", "v", "fk") if hasattr(attn, "S") else ("k", "v"):
                    name = f"{kind}.{i}"
                    if name not in self.rings:  # (no feature ring without S, z)
                        continue
                    buffer = getattr(attn, kind)
                    if buffer.shape[2] < n:  # a KV cache sized for fewer tokens
                        buffer = buffer.new_zeros(*buffer.shape[:2], n, buffer.shape[3])
                    rows = rows_of(
                        self.rings[name], self.scales.get(name), (slice(None), slice(None), slots)
                    )
                    buffer[:, :, :n] = _tensor(rows, dtype)
                    changed[kind] = buffer
                if hasattr(attn, "S"):
                    attn.times[:n] = torch.from_numpy(times[slots])
                    changed["n"] = n
            if lay.use_global:
                attn.S[...] = _tensor(self.inputs[f"S.{i}"], dtype)
                attn.z[...] = _tensor(self.inputs[f"z.{i}"], dtype)
            if lay.retained:
                attn.score[:, :, :n] = _tensor(self.inputs[f"score.{i}"][:, :, slots], dtype)
                changed.update(self.retained[lay.key].ranked(i, dtype))
            if lay.conv_taps:
                conv = _tensor(self.inputs[f"conv.{i}"], dtype)
            attn = dataclasses.replace(attn, **changed)
            layers.append(dataclasses.replace(layer, attn=attn, conv=conv))
        return ModelState(layers)


class RingRows:
    """Sequences stepped together: the ring states of up to ``capacity`` sequences as the rows of
    one batched state (``batch``, a :class:`RingState` with ``rows=capacity``), each sequence's
    state a view of its row (:meth:`row`). The sequences take rows ``0 .. len - 1`` (one that
    leaves hands its row to the last), so a step runs the first ``len`` rows; the batch doubles
    when full and takes a longer reach (:meth:`reach_to`) when a row needs one."""

    def __init__(
        self,
        layouts: list[Layout],
        reach: int | None,
        inv_freq: torch.Tensor | None,
        io: tuple[int, int, int],
        capacity: int = 4,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.layouts, self.inv_freq, self._io = layouts, inv_freq, io
        self._build(reach, capacity)
        self.keys: list[object] = []

    def _build(self, reach: int | None, capacity: int) -> None:
        self.batch = RingState(self.layouts, reach, self.inv_freq, rows=capacity)
        self.batch.make_io(*self._io)
        self.states = [RingState(self.layouts, reach, self.inv_freq, of=(self.batch, i))
                       for i in range(capacity)]  # fmt: skip
        # Bindings of the batch's first n rows, by (session, n, parity).
        self.bindings: dict[tuple, object] = {}
        # Which of the two arrangements of the ping-pong buffers the rows are in (the batch's
        # own dicts stay in the first: :meth:`arranged`); a row not taken catches up on joining.
        self.parity = 0

    @property
    def reach(self) -> int | None:
        return self.batch.reach

    @property
    def capacity(self) -> int:
        return self.batch.rows

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def held_bytes(self) -> int:
        """Bytes the sequences' rows hold now (the batch's arrays, their rows' share: a row
        not taken holds no pages until a sequence writes it)."""
        return self.batch.held_bytes() * len(self.keys) // self.capacity

    def row(self, key: object) -> RingState:
        """The state of sequence ``key`` (a view of its row: valid until the next
        :meth:`add`, :meth:`remove` or :meth:`reach_to`)."""
        return self.states[self.keys.index(key)]

    def add(self, key: object, ring: RingState) -> None:
        """Sequence ``key`` joins with the tokens of ``ring`` (copied into a row)."""
        if key in self.keys:
            raise ValueError(f"{key!r} is already a row")
        self.reach_to(ring.reach)
        ring.copy_into(self._free())
        self.keys.append(key)

    def load(self, key: object, state: ModelState) -> None:
        """Sequence ``key`` joins with a PyTorch decoding state (read into a row; the rows
        must reach as far as it needs: :meth:`reach_to`)."""
        if key in self.keys:
            raise ValueError(f"{key!r} is already a row")
        self._free().load(state)
        self.keys.append(key)

    def _free(self) -> RingState:
        """The first row not taken (the batch doubled if full), in the rows' arrangement."""
        if len(self.keys) == self.capacity:
            self._rebuild(self.reach, 2 * self.capacity)
        state = self.states[len(self.keys)]
        if state.parity != self.parity:
            state.swap()
        return state

    def remove(self, key: object) -> None:
        """Sequence ``key`` leaves; the last row moves into its place."""
        i = self.keys.index(key)
        last = len(self.keys) - 1
        if i != last:
            self.states[last].copy_into(self.states[i])
            self.keys[i] = self.keys[last]
        self.keys.pop()

    def reach_to(self, reach: int | None) -> None:
        """Every row holding ``reach`` slots per ring (``None``: whole rings), if longer."""
        if self.reach is None or (reach is not None and reach <= self.reach):
            return
        self._rebuild(reach, self.capacity)

    def _rebuild(self, reach: int | None, capacity: int) -> None:
        old = self.states[: len(self.keys)]
        self._build(reach, capacity)
        for state, new in zip(old, self.states, strict=False):
            state.copy_into(new)

    def commit(self) -> None:
        """After a step of the first ``len`` rows: each row's commit (its buffers trade
        places); the batch's arrangement follows (:meth:`arranged`)."""
        for state in self.states[: len(self.keys)]:
            state.commit()
        self.parity ^= 1

    def arranged(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The batch's step inputs and outputs in the rows' current arrangement."""
        inputs, outputs = dict(self.batch.inputs), dict(self.batch.outputs)
        if self.parity:
            for i, o in self.batch._swaps:
                inputs[i], outputs[o] = outputs[o], inputs[i]
        return inputs, outputs


def ring_dtype(lay: Layout, kind: str) -> np.dtype:
    """The element type of a layer's state array ``kind``: the ring's for its keys and values
    (Layout.kv_type), else float32."""
    return np.dtype(lay.kv_type if kind in ("k", "v") else np.float32)


def put_rows(ring: np.ndarray, scales: np.ndarray | None, where: tuple, rows: np.ndarray) -> None:
    """float32 ``rows`` into ``ring[where]``: as they are (float16 rings round them), or, with
    ``scales`` (an int8 ring's), as codes and their scales (``kv_codes``)."""
    if scales is None or scales.shape[-1] == 0:
        ring[where] = rows
        return
    codes, row_scales = kv_codes(np.asarray(rows, dtype=np.float32))
    ring[where] = codes
    scales[where] = row_scales


def rows_of(ring: np.ndarray, scales: np.ndarray | None, where: tuple) -> np.ndarray:
    """``ring[where]``'s rows in float32 (an int8 ring's through its ``scales``)."""
    if scales is None or scales.shape[-1] == 0:
        return ring[where].astype(np.float32, copy=False)
    return kv_values(ring[where], scales[where])


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _shapes(lay: Layout, size: int) -> dict[str, tuple[int, ...]]:
    Hkv, C, K, F = lay.kv_heads, size, lay.key_dim, lay.feature_dim
    return {
        "k": (1, Hkv, C, K),
        "v": (1, Hkv, C, K),
        "fk": (1, Hkv, C, F),
        "S": (1, Hkv, F, K),
        "z": (1, Hkv, F),
        "conv": (1, Hkv, max(lay.conv_taps - 1, 0), K),
        "k_scale": (1, Hkv, C, K // KV_GROUP),
        "v_scale": (1, Hkv, C, K // KV_GROUP),
        "new_k": (1, Hkv, 1, K),
        "new_v": (1, Hkv, 1, K),
        "new_fk": (1, Hkv, 1, F),
        "score": (1, Hkv, C + 1),
        "score_out": (1, Hkv, C + 1),
        "S_out": (1, Hkv, F, K),
        "z_out": (1, Hkv, F),
        "conv_out": (1, Hkv, max(lay.conv_taps - 1, 0), K),
    }
