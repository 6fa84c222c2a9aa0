"""The host side of the fixed-shape state: ring buffers, their ``times``, and the control tensors.

One :class:`RingState` holds every state tensor a :class:`~linearize.engine.step.FixedStep`
reads, as numpy arrays the engine binds without copying. Before a step, :meth:`prepare` fills the
control tensors of each layout from its spec (which slots the query sees, which tokens leave for
``S, z``); after it, :meth:`commit` writes the new token's key/value rows into a free slot.

A ring is filled from its first slot, so while a context is shorter than a ring only a prefix of
it holds tokens. ``reach`` bounds the slots a state holds per ring (its arrays are that long);
the engine starts short and moves to a longer reach (:meth:`RingState.grown`) as the context
grows, so a step reads the filled part of a wide ring (or of a softmax cache), not all of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from linearize.engine.step import Layout, state_inputs, state_outputs
from linearize.models.decoder import ModelState

# The step's inputs that are a layout's control tensors (shared by its layers), not state.
CONTROLS = ("mask", "fold_index", "fold_weight", "fold_new", "sink_rotation")
# The ring buffers, one slot per kept token.
RINGS = ("k", "v", "fk")


class _Control:
    """The control tensors and slot bookkeeping shared by every layer of one layout."""

    def __init__(self, lay: Layout, size: int) -> None:
        self.lay = lay
        self.size = C = size
        self.times = np.full(C, -1, dtype=np.int64)
        # Which slots the query sees: added to softmax scores (0 or −inf), else multiplied (1 / 0).
        self.additive = lay.spec.local == "softmax"
        self.mask = np.zeros(C, dtype=np.float32)
        self.fold_index = np.zeros(lay.folds, dtype=np.int64)
        self.fold_weight = np.zeros(lay.folds, dtype=np.float32)
        self.fold_new = np.zeros(1, dtype=np.float32)
        # The sink query's rotation (sinks at cache positions), filled by the engine.
        self.sink_rotation = np.eye(lay.key_dim, dtype=np.float32)
        self.sink_position = -1
        self.slot = -1

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
            self.fold_index[:] = 0
            self.fold_index[: len(leaving)] = leaving
            self.fold_new[0] = decay * float(fold[C])
        self.slot = -1
        if C and bool(keep[C]):
            free = np.flatnonzero((self.times < 0) | fold[:C])
            if not len(free) and lay.capacity > C:
                raise AssertionError(f"position {pos} is past the state's reach ({C} slots)")
            if not len(free):
                raise ValueError(
                    f"context {pos + 1} is past the engine's max context ({C} cached tokens): "
                    "rebuild the engine with a larger max_context"
                )
            self.slot = int(free[0])
            # The step scores the sinks as the ring's first slots (they never leave).
            assert self.slot >= lay.spec.sinks or self.slot == pos, (self.slot, pos)

    def commit(self, pos: int) -> None:
        self.times[self.leaving] = -1
        if self.slot >= 0:
            self.times[self.slot] = pos


class RingState:
    """All state tensors of a fixed-shape step (batch 1) and the position; each ring holds
    ``min(capacity, reach)`` slots (``reach=None``: its whole capacity)."""

    def __init__(self, layouts: list[Layout], reach: int | None = None) -> None:
        self.layouts = layouts
        self.reach = reach
        self.controls: dict[tuple, _Control] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        # Every ring (k, v, fk), its slots on axis 2: [1, Hkv, C, ·].
        self.rings: dict[str, np.ndarray] = {}
        self.pos = 0
        for i, lay in enumerate(layouts):
            size = lay.capacity if reach is None else min(lay.capacity, reach)
            control = self.controls.setdefault(lay.key, _Control(lay, size))
            shapes = _shapes(lay, size)
            for name in state_inputs(i, lay):
                kind = name.split(".")[0]
                if kind in CONTROLS:
                    self.inputs[name] = getattr(control, kind)
                else:
                    self.inputs[name] = np.zeros(shapes[kind], dtype=np.float32)
                if kind in RINGS:
                    self.rings[name] = self.inputs[name]
            for name in state_outputs(i, lay):
                kind = name.split(".")[0]
                self.outputs[name] = np.zeros(shapes[kind], dtype=np.float32)
        # What commit does per step, resolved once: (control, output, ring) row writes, and
        # the (input, output) names of S, z and the conv tails, whose buffers trade places
        # (ping-pong: the step's outputs become the next step's inputs without a copy; the
        # engine binds both arrangements once, ``parity`` says which one is current).
        self._rows: list[tuple[_Control, np.ndarray, np.ndarray]] = []
        self._swaps: list[tuple[str, str]] = []
        self.parity = 0
        for i, lay in enumerate(layouts):
            for name in state_outputs(i, lay):
                kind = name.split(".")[0]
                if kind.startswith("new_"):
                    ring = self.rings[f"{kind[4:]}.{i}"]
                    self._rows.append((self.controls[lay.key], self.outputs[name], ring))
                else:
                    self._swaps.append((f"{kind.split('_')[0]}.{i}", name))

    def nbytes(self) -> int:
        """Bytes of the state at its full reach (what it grows to and never passes): ring
        buffers and their times, S, z, conv tails."""
        kinds = ("k", "v", "fk", "S", "z", "conv")
        total = 0
        for i, lay in enumerate(self.layouts):
            shapes = _shapes(lay, lay.capacity)
            parts = [name.split(".")[0] for name in state_inputs(i, lay)]
            total += sum(4 * math.prod(shapes[kind]) for kind in parts if kind in kinds)
            total += 8 * lay.capacity  # times (int64)
        return total

    def grown(self, reach: int | None) -> RingState:
        """A state holding this one's tokens with a longer ``reach`` (a ring's filled slots
        are kept in place; the slots beyond are empty)."""
        if reach is not None and self.reach is not None and reach < self.reach:
            raise ValueError(f"a state grows; reach {reach} < {self.reach}")
        new = RingState(self.layouts, reach)
        for name, array in self.inputs.items():
            if name in self.rings:
                ring = self.rings[name]
                new.rings[name][:, :, : ring.shape[2]] = ring
            elif name.split(".")[0] not in CONTROLS:
                np.copyto(new.inputs[name], array)
        for key, control in self.controls.items():
            new.controls[key].times[: control.size] = control.times
        new.pos = self.pos
        return new

    def prepare(self) -> None:
        for control in self.controls.values():
            control.prepare(self.pos)

    def swap(self) -> None:
        """The S / z / tail outputs become the inputs (and the old inputs the next outputs)."""
        inputs, outputs = self.inputs, self.outputs
        for i, o in self._swaps:
            inputs[i], outputs[o] = outputs[o], inputs[i]
        self.parity ^= 1

    def commit(self) -> None:
        """After a step: new rows into their slots, S/z/tails from the outputs, times."""
        for control, out, ring in self._rows:
            if control.slot >= 0:
                ring[:, :, control.slot] = out[:, :, 0]
        self.swap()
        for control in self.controls.values():
            control.commit(self.pos)
        self.pos += 1

    def commit_tree(self, path: list[int], nodes: dict[str, np.ndarray]) -> None:
        """Append the accepted tree nodes ``path`` (root→node order), one by one as decode
        steps would: fold what leaves the window into ``S, z``, write the rows, shift the conv
        tails. ``nodes``: the tree pass's ``node_k.i`` / ``node_v.i`` / ``node_fk.i``
        ``[1, Hkv, N, ·]``."""
        for node in path:
            for control in self.controls.values():
                control.prepare(self.pos)
            for i, lay in enumerate(self.layouts):
                control = self.controls[lay.key]
                k, v = nodes[f"node_k.{i}"][:, :, node], nodes[f"node_v.{i}"][:, :, node]
                if lay.use_global:
                    fk = nodes[f"node_fk.{i}"][:, :, node]
                    S, z = self.inputs[f"S.{i}"], self.inputs[f"z.{i}"]
                    if lay.spec.decay < 1:
                        S *= lay.spec.decay
                        z *= lay.spec.decay
                    for slot, weight in zip(control.leaving, control.fold_weight, strict=False):
                        ring_fk = weight * self.rings[f"fk.{i}"][:, :, slot]
                        S += ring_fk[..., :, None] * self.rings[f"v.{i}"][:, :, slot, None, :]
                        z += ring_fk
                    if control.fold_new[0]:
                        S += control.fold_new[0] * fk[..., :, None] * v[..., None, :]
                        z += control.fold_new[0] * fk
                if control.slot >= 0:
                    self.rings[f"k.{i}"][:, :, control.slot] = k
                    self.rings[f"v.{i}"][:, :, control.slot] = v
                    if lay.use_global:
                        self.rings[f"fk.{i}"][:, :, control.slot] = fk
                if lay.conv_taps:
                    tail = self.inputs[f"conv.{i}"]
                    if tail.shape[2]:
                        tail[:, :, :-1] = tail[:, :, 1:].copy()
                        tail[:, :, -1] = v
            for control in self.controls.values():
                control.commit(self.pos)
            self.pos += 1

    def snapshot(self) -> dict:
        """A copy of everything a step changes (for :meth:`restore`, on a state of the same
        ``reach``): the state arrays and times; the control tensors are derived from those
        before every step."""
        arrays = {n: a.copy() for n, a in self.inputs.items() if n.split(".")[0] not in CONTROLS}
        times = {key: c.times.copy() for key, c in self.controls.items()}
        return {"arrays": arrays, "times": times, "pos": self.pos, "reach": self.reach}

    def restore(self, snapshot: dict) -> None:
        if snapshot["reach"] != self.reach:
            raise ValueError(f"a snapshot of reach {snapshot['reach']} on a state of {self.reach}")
        for name, array in snapshot["arrays"].items():
            np.copyto(self.inputs[name], array)
        for key, times in snapshot["times"].items():
            np.copyto(self.controls[key].times, times)
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
                if n > lay.capacity:
                    raise ValueError(
                        f"the prompt holds {n} tokens, past the engine's max context "
                        f"({lay.capacity}): rebuild the engine with a larger max_context"
                    )
                if n > control.size:
                    raise AssertionError(f"{n} kept tokens past the state's reach ({control.size})")
                for kind, tensor in (("k", k), ("v", v), ("fk", fk)):
                    if f"{kind}.{i}" in self.rings:
                        self.rings[f"{kind}.{i}"][...] = 0
                        self.rings[f"{kind}.{i}"][:, :, :n] = tensor.float().numpy()
                control.times[:] = -1
                control.times[:n] = times.numpy()
            if lay.use_global:
                self.inputs[f"S.{i}"][...] = attn.S.float().numpy()
                self.inputs[f"z.{i}"][...] = attn.z.float().numpy()
            if lay.conv_taps:
                self.inputs[f"conv.{i}"][...] = layer.conv.float().numpy()
        self.pos = state.pos


def _shapes(lay: Layout, size: int) -> dict[str, tuple[int, ...]]:
    Hkv, C, K, F = lay.kv_heads, size, lay.key_dim, lay.feature_dim
    return {
        "k": (1, Hkv, C, K),
        "v": (1, Hkv, C, K),
        "fk": (1, Hkv, C, F),
        "S": (1, Hkv, F, K),
        "z": (1, Hkv, F),
        "conv": (1, Hkv, max(lay.conv_taps - 1, 0), K),
        "new_k": (1, Hkv, 1, K),
        "new_v": (1, Hkv, 1, K),
        "new_fk": (1, Hkv, 1, F),
        "S_out": (1, Hkv, F, K),
        "z_out": (1, Hkv, F),
        "conv_out": (1, Hkv, max(lay.conv_taps - 1, 0), K),
    }
