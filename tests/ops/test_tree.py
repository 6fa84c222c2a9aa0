"""The candidate tree's tensors: depths, ancestor masks, chains and paths."""

from __future__ import annotations

import pytest
import torch

from linearize.ops.tree import Tree
from tests.helpers import TREES


@pytest.mark.parametrize("tree_id", TREES)
def test_tree_tensors_agree_with_parents(tree_id):
    parents = TREES[tree_id]
    tree = Tree.from_parents(parents)
    assert len(tree) == len(parents)
    for i, p in enumerate(parents):
        path = tree.path(i).tolist()
        assert path[-1] == i and len(path) == int(tree.depths[i]) + 1
        assert path[:-1] == ([] if p < 0 else tree.path(p).tolist())
        assert tree.ancestors[i].nonzero().flatten().tolist() == sorted(path)
        assert torch.all(tree.chain[i, len(path) :] == -1)


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 2, 0], [-2], []], ids=str)
def test_bad_parents_are_rejected(parents):
    with pytest.raises(ValueError, match="parent"):
        Tree.from_parents(parents)


def test_chains_are_told_from_trees():
    assert Tree.from_parents([-1, 0, 1, 2]).is_chain
    assert Tree.from_parents([-1]).is_chain
    assert not Tree.from_parents([-1, 0, 0]).is_chain
    assert not Tree.from_parents([-1, -1]).is_chain
