"""The prefix state cache: the model state after a prompt prefix, kept so that later prompts
starting with it prefill only their own suffix.

A linear-attention state has the same size whatever the prefix length (~20 MB for SmolLM2), so a
long shared system prompt costs one state; a softmax model's state is its KV cache and grows with
the prefix. Entries are bounded by bytes and evicted least recently used first. Every lookup
returns a private copy: a KV cache is appended in place, so two requests must never share one.
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
        """Keep ``state`` (the state after exactly ``tokens``); the caller may keep using it."""
        key = tuple(tokens)
        assert state.pos == len(key), (state.pos, len(key))
        size = state.nbytes()
        if not key or size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            while self._entries and self.nbytes + size > self.max_bytes:
                self._evict()
            self._entries[key] = (state, size)
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
        return _copy(state), n

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


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
