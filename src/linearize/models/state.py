"""Whole-model state operations: copying a state and selecting or repeating its batch rows.

A :class:`ModelState` is a value, but the softmax KV cache and a linear attention's window buffer
are written in place when there is room, so reusing a state twice (scoring several continuations
of one prefill) needs a copy.
Beam search reorders rows; both are exact for recurrent states and KV caches alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import Tensor

from linearize.layers.attention import AttentionState
from linearize.models.decoder import ModelState
from linearize.ops.linear_attn import LinearAttnState
from linearize.ops.softmax import KVCache

# The tensors with a leading batch dimension, per state type (``times`` is shared by the batch).
_BATCHED = {LinearAttnState: ("S", "z", "k", "fk", "v"), KVCache: ("k", "v")}


def map_batch(state: ModelState, fn: Callable[[Tensor], Tensor]) -> ModelState:
    """A new state with ``fn`` applied to every batch-first tensor (others copied)."""
    layers = []
    for layer in state.layers:
        attn = layer.attn
        names = _BATCHED[type(attn)]
        changed = {name: fn(getattr(attn, name)) for name in names}
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


def batch_size(state: ModelState) -> int:
    attn = state.layers[0].attn
    return getattr(attn, _BATCHED[type(attn)][0]).shape[0]
