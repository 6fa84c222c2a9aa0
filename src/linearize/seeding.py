"""Random draws that depend on a seed alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block torch's CPU generator starts from ``seed``; after it the caller's random
    state is as it was. What the block draws depends on ``seed`` alone, not on what the process
    drew before, and the process draws afterwards what it would have drawn without the block."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
