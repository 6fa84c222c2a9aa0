"""A candidate tree as tensors, built once per verification and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tree:
    """``parents: [N]`` (−1 = child of the committed state; parents precede children);
    ``depths: [N]`` (0 for children of the committed state); ``ancestors: [N, N]`` bool,
    ``ancestors[i, j]`` = node ``j`` is ``i`` or one of its ancestors; ``chain: [N, D]``,
    ``chain[i, d]`` = the ancestor of ``i`` at depth ``d`` (−1 past ``depths[i]``)."""

    parents: Tensor
    depths: Tensor
    ancestors: Tensor
    chain: Tensor

    @classmethod
    def from_parents(cls, parents: Tensor | list[int]) -> Tree:
        parents = torch.as_tensor(parents, dtype=torch.long).cpu()
        if parents.dim() != 1 or parents.numel() == 0:
            raise ValueError(
                f"parents must be a non-empty 1-D index list, got {tuple(parents.shape)}"
            )
        N = parents.shape[0]
        depths = [0] * N
        chains: list[list[int]] = []
        for i, p in enumerate(parents.tolist()):
            if not -1 <= p < i:
                raise ValueError(
                    f"parents[{i}] = {p}: each parent must be -1 or an earlier node index (< {i})"
                )
            depths[i] = 0 if p < 0 else depths[p] + 1
            chains.append(([] if p < 0 else chains[p]) + [i])
        D = max(depths) + 1
        chain = torch.full((N, D), -1, dtype=torch.long)
        ancestors = torch.zeros(N, N, dtype=torch.bool)
        for i, c in enumerate(chains):
            chain[i, : len(c)] = torch.tensor(c)
            ancestors[i, c] = True
        return cls(parents, torch.tensor(depths), ancestors, chain)

    def __len__(self) -> int:
        return self.parents.shape[0]

    @property
    def is_chain(self) -> bool:
        """Each node's parent is the node before it (a run of consecutive tokens)."""
        return bool((self.parents == torch.arange(-1, len(self) - 1)).all())

    def path(self, node: int) -> Tensor:
        """Node indices from the root to ``node``, inclusive."""
        return self.chain[node, : int(self.depths[node]) + 1]
