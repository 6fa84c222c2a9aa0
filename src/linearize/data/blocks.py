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
