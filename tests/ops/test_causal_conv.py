"""The causal depthwise convolution: parallel ≡ recurrent ≡ naive; the unfolded tree form ≡ the
sequential convolution along each node's root→node path."""

from __future__ import annotations

import pytest
import torch

from linearize.ops import causal_conv
from linearize.ops.tree import Tree
from tests.helpers import TREES, assert_close

B, H, HKV, V = 2, 4, 2, 3
FORMS = {"parallel": causal_conv.parallel, "recurrent": causal_conv.recurrent}


def _values(T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, HKV, V, generator=g, dtype=torch.float64).requires_grad_()


def _taps(P: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(H, P, generator=g, dtype=torch.float64).requires_grad_()


def _tail(P: int) -> torch.Tensor:
    return causal_conv.init_state(B, HKV, V, P, dtype=torch.float64)


def _grads(o, inputs):
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
    return torch.autograd.grad((o * do).sum(), inputs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("P", [1, 4, 7])
@pytest.mark.parametrize("T", [1, 7, 65])
def test_form_matches_naive(T, P, form):
    v, w = _values(T), _taps(P)
    ref = causal_conv.naive(v, w)
    o, tail = FORMS[form](v, w, _tail(P))
    assert_close(f"{form} o", ref, o, 1e-12)
    assert tail.shape == (B, HKV, P - 1, V)
    for name, r, g in zip(["dv", "dw"], _grads(ref, [v, w]), _grads(o, [v, w]), strict=True):
        assert_close(f"{form} {name}", r, g, 1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("P", [1, 4, 7])
def test_state_in_pieces(P, form):
    """Pieces of 3, 17 and the rest (including pieces shorter than the tail) ≡ one pass."""
    T = 30
    v, w = _values(T), _taps(P)
    whole, whole_tail = FORMS[form](v, w, _tail(P))
    tail, outputs = _tail(P), []
    for s, e in [(0, 3), (3, 4), (4, 21), (21, T)]:
        o, tail = FORMS[form](v[:, s:e], w, tail)
        outputs.append(o)
    o = torch.cat(outputs, 1)
    assert_close("pieces o", causal_conv.naive(v, w), o, 1e-12)
    assert_close("pieces vs whole", whole, o, 1e-12)
    assert_close("tail", whole_tail, tail, 0)
    assert_close("tail = last values", v[:, T - (P - 1) :].transpose(1, 2), tail, 0)
    for name, r, g in zip(["dv", "dw"], _grads(whole, [v, w]), _grads(o, [v, w]), strict=True):
        assert_close(f"pieces {name}", r, g, 1e-12)


@pytest.mark.parametrize("tree_id", TREES)
@pytest.mark.parametrize("P", [1, 3, 4])
@pytest.mark.parametrize("L", [0, 1, 2, 9])
def test_unfolded_tree_matches_path_convolution(L, P, tree_id):
    """Trees deeper than the tail (depth 5 > P − 1), prompts shorter than the tail (L < P − 1)."""
    tree = Tree.from_parents(TREES[tree_id])
    prompt, nodes, w = _values(L, seed=2), _values(len(tree), seed=3), _taps(P)
    tail = causal_conv.parallel(prompt, w, _tail(P))[1] if L else _tail(P)
    o, same = causal_conv.tree(nodes, w, tail, tree=tree)
    assert same is tail
    for i in range(len(tree)):
        sequence = torch.cat([prompt, nodes[:, tree.path(i)]], 1)
        assert_close(f"node {i}", causal_conv.naive(sequence, w)[:, -1], o[:, i], 1e-12)
    # The unfolded form is differentiable in the tree values and the taps.
    ref = torch.stack(
        [
            causal_conv.naive(torch.cat([prompt, nodes[:, tree.path(i)]], 1), w)[:, -1]
            for i in range(len(tree))
        ],
        1,
    )
    for name, r, g in zip(
        ["dv", "dw"], _grads(ref, [nodes, w]), _grads(o, [nodes, w]), strict=True
    ):
        assert_close(f"tree {name}", r, g, 1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_empty_input(form):
    """Zero new values: an empty output and the tail unchanged."""
    tail = torch.randn(B, HKV, 3, V, dtype=torch.float64)
    o, new_tail = FORMS[form](_values(0), _taps(4), tail)
    assert o.shape == (B, 0, H, V)
    assert torch.equal(new_tail, tail)


def test_symmetric_reads_the_future():
    """The encoder-style convolution is what the leakage check must catch."""
    v, w = _values(9), _taps(5)
    out = causal_conv.symmetric(v, w)
    moved = v.detach().clone()
    moved[:, 5:] += 1.0
    assert (causal_conv.symmetric(moved, w)[:, :5] - out[:, :5]).abs().max() > 1e-3
    assert torch.equal(
        causal_conv.parallel(moved, w, _tail(5))[0][:, :5],
        causal_conv.parallel(v, w, _tail(5))[0][:, :5],
    )


def test_inference_and_training_paths_agree():
    """parallel() convolves with conv1d under no_grad and with shifted sums under autograd."""
    v, w = _values(37), _taps(5)
    tail = torch.randn(B, HKV, 4, V, dtype=torch.float64)
    with torch.no_grad():
        fast, fast_tail = causal_conv.parallel(v, w, tail)
    w.requires_grad_(True)
    slow, slow_tail = causal_conv.parallel(v, w, tail)
    assert_close("conv1d vs shifted sums", slow.detach(), fast, 1e-13)
    assert torch.equal(fast_tail, slow_tail)
