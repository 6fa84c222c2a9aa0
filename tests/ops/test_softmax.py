"""Softmax attention over a KV cache: every form ≡ the naive definition."""

from __future__ import annotations

import pytest
import torch

from linearize.ops import softmax
from linearize.ops.tree import Tree
from tests.helpers import TREES, assert_close

B, H, HKV, K, V = 2, 4, 2, 8, 8
FORMS = {"parallel": softmax.parallel, "chunk": softmax.chunk, "recurrent": softmax.recurrent}


def _inputs(T: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, H, K), (B, T, HKV, K), (B, T, HKV, V)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def _state(capacity: int = 4) -> softmax.KVCache:
    # A small capacity so that the tests cross the cache's growth.
    return softmax.init_state(B, HKV, K, V, dtype=torch.float64, capacity=capacity)


def _grads(o, inputs):
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
    return torch.autograd.grad((o * do).sum(), inputs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [1, 7, 65])
def test_form_matches_naive(T, form):
    inputs = _inputs(T)
    ref = softmax.naive(*inputs)
    o, state = FORMS[form](*inputs, _state())
    assert_close(f"{form} o", ref, o, 1e-12)
    assert state.pos == T
    for name, r, g in zip("qkv", _grads(ref, inputs), _grads(o, inputs), strict=True):
        assert_close(f"{form} d{name}", r, g, 1e-11)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("pieces", [[3, 17, 45], [1] * 9], ids=["3-17-rest", "token-by-token"])
def test_state_in_pieces(pieces, grad):
    """The cache passed along (appended in place without autograd) ≡ one pass."""
    T = sum(pieces)
    inputs = _inputs(T)
    ref = softmax.naive(*inputs)
    state, outputs, s = _state(), [], 0
    with torch.set_grad_enabled(grad):
        for n in pieces:
            o, state = softmax.recurrent(*[x[:, s : s + n] for x in inputs], state)
            outputs.append(o)
            s += n
    assert_close("pieces o", ref, torch.cat(outputs, 1), 1e-12)
    keys, values = state.kept()
    assert_close("cache k", inputs[1].transpose(1, 2), keys, 0)
    assert_close("cache v", inputs[2].transpose(1, 2), values, 0)
    assert state.nbytes() == T * B * HKV * (K + V) * 8


@pytest.mark.parametrize("tree_id", TREES)
@pytest.mark.parametrize("L", [0, 5])
def test_tree_matches_path_decoding(L, tree_id):
    tree = Tree.from_parents(TREES[tree_id])
    prompt, nodes = _inputs(L, seed=2), _inputs(len(tree), seed=3)
    with torch.no_grad():
        _, state = softmax.parallel(*prompt, _state())
        o, same = softmax.tree(*nodes, state, tree=tree)
        assert same is state
        for i in range(len(tree)):
            path = [x[:, tree.path(i)] for x in nodes]
            ref = softmax.naive(*[torch.cat([p, x], 1) for p, x in zip(prompt, path, strict=True)])
            assert_close(f"node {i}", ref[:, -1], o[:, i], 1e-12)
