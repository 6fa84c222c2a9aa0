"""Candidate trees for Medusa: a tree spec is data, its buffers a pure function of it.

A **tree spec** is a list of paths of top-k indices: the path ``(0, 2)`` is the candidate made of
head 0's most likely token followed by head 1's third most likely token. Node 0 of the verified
tree is the **root**: the token sampled at the end of the previous step and not yet fed to the
model; node ``1 + i`` is path ``i`` (paths sorted by length, then lexicographically). One forward
pass over the tree both feeds the root and verifies every candidate.

The size of a tree is its number of nodes including the root (what one verification pass feeds):
``"tree-16"`` has a root and 15 candidates.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from linearize.ops.tree import Tree

Path = tuple[int, ...]


@dataclass(frozen=True)
class TreeBuffers:
    """Everything a Medusa step needs about a tree spec, built once.

    ``paths``: the sorted spec; ``tree``: the :class:`Tree` (parents, depths, ancestor mask);
    ``head: [N]`` the Medusa head each node's token comes from (−1 for the root);
    ``rank: [N]`` its top-k index in that head (0 for the root); ``retrieve: [L, D]`` the
    root→leaf node paths, one row per leaf, padded with −1.
    """

    paths: tuple[Path, ...]
    tree: Tree
    head: Tensor
    rank: Tensor
    retrieve: Tensor

    def __len__(self) -> int:
        return len(self.tree)

    @property
    def num_heads(self) -> int:
        """Heads the spec reads (its depth)."""
        return max((len(p) for p in self.paths), default=0)

    @property
    def top_k(self) -> int:
        """Most candidates the spec takes from any one head."""
        return 1 + max((p[-1] for p in self.paths), default=0)

    def candidates(self, root: int, topk_tokens: Tensor) -> Tensor:
        """Node tokens ``[N]``: ``root``, then ``topk_tokens[head, rank]`` (``[M, k]``) per node."""
        tokens = topk_tokens[self.head.clamp_min(0), self.rank]
        tokens[0] = root
        return tokens


def _check_paths(paths: Sequence[Sequence[int]]) -> tuple[Path, ...]:
    spec = tuple(sorted({tuple(int(i) for i in p) for p in paths}, key=lambda p: (len(p), p)))
    if len(spec) != len(paths):
        raise ValueError("the tree spec repeats a path")
    present = set(spec)
    for p in spec:
        if not p or min(p) < 0:
            raise ValueError(f"tree path {list(p)}: paths are non-empty lists of indices >= 0")
        if len(p) > 1 and p[:-1] not in present:
            raise ValueError(f"tree path {list(p)} has no parent path {list(p[:-1])} in the spec")
    return spec


def build_tree_buffers(paths: Sequence[Sequence[int]]) -> TreeBuffers:
    """The pure function from a tree spec to its buffers (Medusa's ``generate_medusa_buffers``).

    An empty spec is the root alone: plain decoding through the tree path.
    """
    spec = _check_paths(paths)
    index = {p: i + 1 for i, p in enumerate(spec)}
    parents = [-1] + [index.get(p[:-1], 0) for p in spec]
    tree = Tree.from_parents(parents)
    head = torch.tensor([-1] + [len(p) - 1 for p in spec], dtype=torch.long)
    rank = torch.tensor([0] + [p[-1] for p in spec], dtype=torch.long)
    has_child = torch.zeros(len(parents), dtype=torch.bool)
    has_child[[q for q in parents if q >= 0]] = True
    leaves = (~has_child).nonzero().flatten().tolist()
    retrieve = torch.stack([tree.chain[leaf] for leaf in leaves])
    return TreeBuffers(spec, tree, head, rank, retrieve)


def tree_from_accuracies(rank_accuracy: Sequence[Sequence[float]], num_nodes: int) -> list[Path]:
    """The ``num_nodes``-node tree (root included) with the most expected accepted tokens.

    ``rank_accuracy[m][i]``: how often head ``m``'s ``i``-th ranked token is the right one.
    Assuming heads are independent, a path's acceptance probability is the product of its ranks'
    accuracies; since every factor is ≤ 1, a best-first search that only extends chosen paths
    returns the best prefix-closed set (Medusa's tree construction).
    """
    if num_nodes < 1:
        raise ValueError(f"a tree needs at least its root: num_nodes >= 1, got {num_nodes}")
    acc = [[min(max(float(a), 0.0), 1.0) for a in head] for head in rank_accuracy]
    heap: list[tuple[float, Path]] = [(-a, (i,)) for i, a in enumerate(acc[0] if acc else [])]
    heapq.heapify(heap)
    chosen: list[Path] = []
    while heap and len(chosen) < num_nodes - 1:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < len(acc):
            for i, a in enumerate(acc[len(path)]):
                heapq.heappush(heap, (neg * a, (*path, i)))
    return sorted(chosen, key=lambda p: (len(p), p))


def expected_accepted(paths: Sequence[Path], rank_accuracy: Sequence[Sequence[float]]) -> float:
    """Expected tokens per verification step: 1 (the root's successor) + Σ P(path accepted)."""
    total = 1.0
    for path in paths:
        p = 1.0
        for depth, i in enumerate(path):
            row = rank_accuracy[depth] if depth < len(rank_accuracy) else ()
            p *= float(row[i]) if i < len(row) else 0.0
        total += p
    return total


# A typical accuracy profile of trained Medusa heads (Medusa paper, Vicuna-7B: top-1 ≈ 0.6 for
# the first head, decaying with depth): the default trees are this profile's best trees.
TYPICAL_RANK_ACCURACY = (
    (0.60, 0.12, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.006),
    (0.35, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.006),
    (0.25, 0.08, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.006),
    (0.20, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.006),
)
TREE_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_TREES: dict[str, list[Path]] = {
    f"tree-{n}": tree_from_accuracies(TYPICAL_RANK_ACCURACY, n) for n in TREE_SIZES
}


def list_trees() -> list[str]:
    """Names accepted by :func:`tree_spec` (plus ``"auto"`` in the generation config)."""
    return list(DEFAULT_TREES)


def tree_spec(name_or_paths: str | Sequence[Sequence[int]]) -> list[Path]:
    """A default tree by name, a JSON list of paths (``"[[0], [0, 0], [1]]"``), or paths."""
    if not isinstance(name_or_paths, str):
        return list(_check_paths(name_or_paths))
    text = name_or_paths.strip()
    if text.startswith("["):
        try:
            paths = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"tree {text!r} is not a valid JSON list of paths ({e})") from None
        if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
            raise ValueError(f"tree {text!r}: expected a JSON list of lists of indices")
        return list(_check_paths(paths))
    if text not in DEFAULT_TREES:
        raise ValueError(
            f"unknown tree {text!r}; valid: {list_trees()}, 'auto', or a JSON list of paths"
        )
    return list(DEFAULT_TREES[text])
