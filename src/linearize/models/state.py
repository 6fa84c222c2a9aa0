"""Whole-model state operations: copying a state and selecting or repeating its batch rows,
detaching it from autograd, and writing it as plain tensors (for a training checkpoint).

A :class:`ModelState` is a value, but the softmax KV cache and a linear attention's window buffer
are written in place when there is room, so reusing a state twice (scoring several continuations
of one prefill) needs a copy.
Beam search reorders rows; both are exact for recurrent states and KV caches alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from torch import Tensor

from linearize.layers.attention import AttentionState
from linearize.models.decoder import ModelState
from linearize.ops.linear_attn import RETAINED, LinearAttnState
from linearize.ops.softmax import KVCache

# The tensors with a leading batch dimension, per state type (``times`` is shared by the batch;
# the retained cache's are ``None`` without one).
_BATCHED = {LinearAttnState: ("S", "z", "k", "fk", "v", *RETAINED), KVCache: ("k", "v")}


def map_batch(state: ModelState, fn: Callable[[Tensor], Tensor]) -> ModelState:
    """A new state with ``fn`` applied to every batch-first tensor (others copied)."""
    layers = []
    for layer in state.layers:
        attn = layer.attn
        names = _BATCHED[type(attn)]
        tensors = {name: getattr(attn, name) for name in names}
        changed = {name: fn(t) for name, t in tensors.items() if t is not None}
        if isinstance(attn, LinearAttnState):
            changed["times"] = attn.times.clone()
        conv = None if layer.conv is None else fn(layer.conv)
        layers.append(AttentionState(replace(attn, **changed), conv))
    return ModelState(layers)


def copy_state(state: ModelState) -> ModelState:
    """An independent copy: running the model on it leaves ``state`` untouched."""
    return map_batch(state, Tensor.clone)


def select_rows(state: ModelState, index: Tensor) -> ModelState:
    """The state of batch rows ``index`` (``[B']``, repeats allowed), e.g. beams after a step."""
    return map_batch(state, lambda t: t.index_select(0, index.to(t.device)))


def row_views(state: ModelState) -> list[ModelState]:
    """Each batch row as a batch-1 state viewing the batched state's memory, not a copy (a
    wide window's buffers are ~25 MB a layer a row; copying them was most of a batched server
    prefill): decoding a row in place writes only its own part. ``times``, shared by the
    batch, is each row's own copy. A view keeps the whole batch alive: copy a row that is kept
    (:func:`copy_state`)."""
    return [map_batch(state, lambda t, i=i: t[i : i + 1]) for i in range(batch_size(state))]


def batch_size(state: ModelState) -> int:
    attn = state.layers[0].attn
    return getattr(attn, _BATCHED[type(attn)][0]).shape[0]


def detach_state(state: ModelState) -> ModelState:
    """The same values cut from autograd: training carries a state into the next block without
    backpropagating into the blocks before it (truncated backpropagation through time)."""
    return map_batch(state, Tensor.detach)


_KINDS = {"linear": LinearAttnState, "softmax": KVCache}


def state_to_dict(state: ModelState) -> list[dict[str, Any]]:
    """One dict of tensors and ints per layer, loadable with ``torch.load(weights_only=True)``."""
    layers = []
    for layer in state.layers:
        kind = next(name for name, cls in _KINDS.items() if isinstance(layer.attn, cls))
        attn = {f.name: getattr(layer.attn, f.name) for f in fields(layer.attn)}
        layers.append({"kind": kind, "attn": attn, "conv": layer.conv})
    return layers


def state_from_dict(layers: list[dict[str, Any]]) -> ModelState:
    """The inverse of :func:`state_to_dict`."""
    return ModelState(
        [AttentionState(_KINDS[layer["kind"]](**layer["attn"]), layer["conv"]) for layer in layers]
    )
