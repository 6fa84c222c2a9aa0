"""Packing token ids into training blocks and the seeded, resumable order they are read in."""

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def pack_blocks(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut `tokens: [T]` into `[T // block_size, block_size]` training blocks, dropping the tail."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = len(tokens) // block_size
    if n == 0:
        raise ValueError(
            f"corpus of {len(tokens)} tokens is shorter than one block of {block_size}"
        )
    return tokens[: n * block_size].view(n, block_size)


def block_order(n_blocks: int, seed: int, epoch: int) -> list[int]:
    """A permutation of `range(n_blocks)` that depends only on `(seed, epoch)`."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    order = list(range(n_blocks))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


@dataclass
class BlockSampler:
    """Endless, resumable walk over blocks: epoch after epoch, each in `block_order`.

    Position `step` (counted in blocks) is epoch `step // n_blocks`; a trainer resuming after
    `s` optimizer steps of `b` blocks calls `positions(s * b)`."""

    n_blocks: int
    seed: int = 0

    def positions(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """Yield `(epoch, block index)` from position `start` on."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        epoch, offset = divmod(start, self.n_blocks)
        while True:
            for index in block_order(self.n_blocks, self.seed, epoch)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.positions()


@dataclass
class StreamSampler:
    """Blocks read in order by ``streams`` sequences side by side, for training that carries
    each sequence's recurrent state into its next block.

    The blocks are cut into ``streams`` contiguous spans of ``n_blocks // streams`` blocks;
    at step ``s`` stream ``j`` reads block ``j * span + s % span``, so consecutive steps give
    each stream consecutive text. Every stream starts over (with a fresh state) when
    ``s % span == 0``; the tail blocks past ``streams * span`` are not read."""

    n_blocks: int
    streams: int

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.n_blocks < self.streams:
            raise ValueError(
                f"{self.n_blocks} blocks cannot feed {self.streams} streams read in order; "
                "use more training text or a smaller batch"
            )

    @property
    def span(self) -> int:
        return self.n_blocks // self.streams

    def blocks(self, step: int) -> list[int]:
        """The block of each stream at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return [j * self.span + step % self.span for j in range(self.streams)]

    def starts(self, step: int) -> bool:
        """Whether every stream starts over at ``step`` (its state reset)."""
        return step % self.span == 0
