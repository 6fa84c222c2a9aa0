"""Tree specs → buffers (a pure function), the accuracy-driven tree builder, default trees."""

from __future__ import annotations

import itertools

import pytest
import torch

from linearize.generation import DEFAULT_TREES, build_tree_buffers, tree_from_accuracies, tree_spec
from linearize.generation.trees import expected_accepted


def test_buffers_of_a_small_spec():
    buffers = build_tree_buffers([[1], [0], [0, 0], [0, 1], [0, 0, 0]])
    assert buffers.paths == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert buffers.tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert buffers.tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert buffers.head.tolist() == [-1, 0, 0, 1, 1, 2]
    assert buffers.rank.tolist() == [0, 0, 1, 0, 1, 0]
    assert buffers.retrieve.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert buffers.tree.ancestors[5].tolist() == [True, True, False, True, False, True]
    topk = torch.tensor([[10, 11], [20, 21], [30, 31]])
    assert buffers.candidates(99, topk).tolist() == [99, 10, 11, 20, 21, 30]
    assert (buffers.num_heads, buffers.top_k) == (3, 2)


def test_buffers_are_a_pure_function():
    spec = [[0], [0, 0], [1]]
    a, b = build_tree_buffers(spec), build_tree_buffers(list(reversed(spec)))
    assert a.paths == b.paths
    assert torch.equal(a.tree.parents, b.tree.parents) and torch.equal(a.retrieve, b.retrieve)
    assert len(build_tree_buffers([])) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([[0, 0]], "no parent path"),
        ([[0], [0]], "repeats"),
        ([[0], [-1]], ">= 0"),
        ([[]], "non-empty"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        build_tree_buffers(spec)


def test_builder_is_optimal_on_small_cases():
    acc = [[0.6, 0.2, 0.1], [0.4, 0.3, 0.05]]
    every = [p for d in (1, 2) for p in itertools.product(range(3), repeat=d)]
    for nodes in range(1, 8):
        built = tree_from_accuracies(acc, nodes)
        assert len(built) == min(nodes - 1, len(every))
        best = 0.0
        for subset in itertools.combinations(every, nodes - 1):
            if all(len(p) == 1 or p[:-1] in subset for p in subset):
                best = max(best, expected_accepted(subset, acc))
        assert expected_accepted(built, acc) == pytest.approx(best)


def test_default_trees_and_names():
    assert [len(build_tree_buffers(spec)) for spec in DEFAULT_TREES.values()] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
    ]
    assert tree_spec("tree-8") == DEFAULT_TREES["tree-8"]
    assert tree_spec("[[0], [0, 0], [1]]") == [(0,), (1,), (0, 0)]
    with pytest.raises(ValueError, match="unknown tree 'big'.*tree-64"):
        tree_spec("big")
    with pytest.raises(ValueError, match="JSON"):
        tree_spec("[[0], [0, 0")
