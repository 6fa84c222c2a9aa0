"""The prefix state cache: the model state after a prompt prefix, kept so that later prompts
starting with it prefill only their own suffix.

A linear-attention state has a fixed size whatever the prefix length, so a long shared system
prompt costs one state; a softmax model's state is its KV cache and grows with the prefix. An
entry keeps only what its state uses: window buffers cut to their kept tokens (a wide window of
8,188 slots holds a 500-token chat in 500: the default model's state is 195 MB, its entry 51 MB
after 500 tokens, 81 MB after 2,048), a KV cache to its filled positions; a lookup pads them back
to their length.
Entries are bounded by these bytes and evicted least recently used first. Every lookup returns a
private copy: buffers are written in place, so two requests must never share one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from linearize.models.decoder import ModelState
from linearize.ops.buffers import lazy_padded
from linearize.ops.linear_attn import LinearAttnState

logger = logging.getLogger(__name__)


class PrefixCache:
    """``put(tokens, state)``; ``lookup(tokens) -> (state copy, n)`` for the longest cached
    proper prefix ``tokens[:n]`` (``(None, 0)`` when none); bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[ModelState, int]] = OrderedDict()
        self._lengths: dict[int, int] = {}  # prefix length -> entries of that length
        self.nbytes = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: Sequence[int], state: ModelState) -> None:
        """Keep a copy of what ``state`` (the state after exactly ``tokens``) uses; the caller
        may keep using it."""
        key = tuple(tokens)
        assert state.pos == len(key), (state.pos, len(key))
        if not key:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        entry = _compact(state)
        size = entry.state.nbytes()  # (cut as it is: what the entry holds)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            while self._entries and self.nbytes + size > self.max_bytes:
                self._evict()
            self._entries[key] = (entry, size)
            self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
            self.nbytes += size

    def _evict(self) -> None:
        key, (_, size) = self._entries.popitem(last=False)
        self.nbytes -= size
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]
        logger.debug("prefix cache: evicted a %d-token prefix (%d bytes)", len(key), size)

    def lookup(self, tokens: Sequence[int]) -> tuple[ModelState | None, int]:
        """A copy of the state after the longest cached prefix shorter than ``tokens``."""
        with self._lock:
            for n in sorted(self._lengths, reverse=True):
                if n >= len(tokens):
                    continue
                entry = self._entries.get(tuple(tokens[:n]))
                if entry is not None:
                    self._entries.move_to_end(tuple(tokens[:n]))
                    self.hits += 1
                    state = entry[0]
                    break
            else:
                self.misses += 1
                return None, 0
        return _restore(state), n

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


@dataclasses.dataclass
class _Compact:
    """A state's copy cut to what it uses, and each layer's buffer length to pad back to."""

    state: ModelState
    lengths: list[int]


def _compact(state: ModelState) -> _Compact:
    layers, lengths = [], []
    for layer in state.layers:
        attn = layer.attn
        lengths.append(attn.k.shape[2])
        if isinstance(attn, LinearAttnState):
            n = attn.n
            cut = {name: getattr(attn, name)[:, :, :n] for name in ("k", "fk", "v")}
            cut["times"] = attn.times[:n]
            if attn.score is not None:
                cut["score"] = attn.score[..., :n]
        else:  # a KV cache: its filled positions
            cut = {"k": attn.k[:, :, : attn.pos], "v": attn.v[:, :, : attn.pos]}
        layers.append(_copy(dataclasses.replace(layer, attn=dataclasses.replace(attn, **cut))))
    return _Compact(ModelState(layers), lengths)


def _restore(entry: _Compact) -> ModelState:
    """A private copy of the entry's state at its buffers' full lengths (empty slots: zeros,
    times −1, as a fresh state's)."""
    layers = []
    for layer, length in zip(entry.state.layers, entry.lengths, strict=True):
        attn = layer.attn
        names = ("k", "fk", "v") if isinstance(attn, LinearAttnState) else ("k", "v")
        # Padded into new tensors; everything else copied.
        grown = {name: _padded(getattr(attn, name), length, 2) for name in names}
        if isinstance(attn, LinearAttnState):
            grown["times"] = _padded(attn.times, length, 0, -1)
            if attn.score is not None:
                grown["score"] = _padded(attn.score, length, 2)
        fields = [f.name for f in dataclasses.fields(attn) if f.name not in grown]
        rest = {name: _copy(getattr(attn, name)) for name in fields}
        attn = dataclasses.replace(attn, **rest, **grown)
        layers.append(dataclasses.replace(layer, attn=attn, conv=_copy(layer.conv)))
    return ModelState(layers)


def _padded(t: torch.Tensor, length: int, dim: int, value: float = 0) -> torch.Tensor:
    """A new tensor: ``t`` padded along ``dim`` to ``length`` with ``value`` (zeros: only the
    part ``t`` fills touched, :func:`~linearize.ops.buffers.lazy_padded`)."""
    if value == 0:
        return lazy_padded(t, length, dim)
    out = t.new_full((*t.shape[:dim], length, *t.shape[dim + 1 :]), value)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _copy(value: Any) -> Any:
    """A copy of a state (dataclasses, lists, tensors) owning its own tensor storage."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        return dataclasses.replace(value, **{f.name: _copy(getattr(value, f.name)) for f in fields})
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
