"""The attention layer, for every registry attention and every ablation of the augmented layer:
all forms agree (forward and gradients), the tree form is exact, commit ≡ sequential decoding,
the state has a fixed size, and nothing reads the future."""

from __future__ import annotations

import pytest
import torch

from linearize import Tree, build_attention
from linearize.check import check_causality
from tests.helpers import (
    CAUSAL_CASES,
    GROUP,
    NONCAUSAL_CASES,
    TINY,
    TREES,
    assert_close,
    tiny_layer,
)

D = TINY["hidden_size"]


def _x(T: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T, D, generator=g, dtype=torch.float64)


def _run_pieces(layer, x, form, pieces):
    state, outputs, s = None, [], 0
    for n in pieces:
        y, state = layer(x[:, s : s + n], state=state, form=form)
        outputs.append(y)
        s += n
    return torch.cat(outputs, 1), state


def _gradients(layer, x, run) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    x = x.clone().requires_grad_()
    y, _ = run(layer, x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    names, params = zip(*layer.named_parameters(), strict=True)
    grads = torch.autograd.grad((y * dy).sum(), [x, *params], allow_unused=True)
    return y.detach(), dict(zip(["x", *names], grads, strict=True))


RUNS = {
    "chunk": lambda layer, x: layer(x, form="chunk"),
    "recurrent": lambda layer, x: layer(x, form="recurrent"),
    "recurrent-token-by-token": lambda layer, x: _run_pieces(
        layer, x, "recurrent", [1] * x.shape[1]
    ),
    "recurrent-3-17-rest": lambda layer, x: _run_pieces(layer, x, "recurrent", [3, 17, 3]),
    "chunk-3-17-rest": lambda layer, x: _run_pieces(layer, x, "chunk", [3, 17, 3]),
    "parallel-3-17-rest": lambda layer, x: _run_pieces(layer, x, "parallel", [3, 17, 3]),
}


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize(("name", "options"), CAUSAL_CASES)
def test_forms_agree(name, options, run):
    """Every form, in one pass or in pieces with the state carried along, ≡ the parallel form."""
    layer = tiny_layer(name, **options)
    x = _x(23)
    ref, ref_grads = _gradients(layer, x, lambda layer, x: layer(x, form="parallel"))
    y, grads = _gradients(layer, x, RUNS[run])
    assert_close(f"{run} y", ref, y, 1e-10)
    for param, grad in grads.items():
        assert_close(f"{run} d{param}", ref_grads[param], grad, 1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), CAUSAL_CASES)
def test_single_token(name, options):
    layer = tiny_layer(name, **options)
    x = _x(1)
    ref, _ = layer(x, form="parallel")
    for form in ("chunk", "recurrent", "auto"):
        assert_close(form, ref, layer(x, form=form)[0], 1e-12)


def _committed(layer, L: int):
    if L == 0:
        return layer.init_state(1, dtype=torch.float64)
    return layer(_x(L, seed=2, batch=1), form="chunk")[1]


# L = 0: the tree starts a sequence (and is longer than the conv history); L = GROUP - 2: depth
# >= 4 crosses a group boundary; L = 11: several groups (and windows) already folded.
PREFIXES = [0, GROUP - 2, 11]


@pytest.mark.parametrize("tree_id", TREES)
@pytest.mark.parametrize("L", PREFIXES)
@pytest.mark.parametrize(("name", "options"), CAUSAL_CASES)
def test_tree_matches_path_decoding(name, options, L, tree_id):
    """Every node's output ≡ recurrent decoding of its root→node path after the prefix."""
    layer = tiny_layer(name, **options)
    tree = Tree.from_parents(TREES[tree_id])
    nodes = _x(len(tree), seed=3, batch=1)
    with torch.no_grad():
        state = _committed(layer, L)
        y = layer.attend_tree(nodes, tree, state)
        for i in range(len(tree)):
            ref, _ = layer(nodes[:, tree.path(i)], state=state, form="recurrent")
            assert_close(f"node {i} (depth {int(tree.depths[i])})", ref[:, -1], y[:, i], 1e-10)


def _assert_same_state(ref, out):
    assert out.pos == ref.pos
    assert out.nbytes() == ref.nbytes()
    for i, (r, o) in enumerate(zip(ref.attn.kept(), out.attn.kept(), strict=True)):
        assert_close(f"kept[{i}]", r, o, 1e-12)
    if ref.conv is not None:
        assert_close("conv tail", ref.conv, out.conv, 1e-12)
    for field in ("S", "z"):
        if hasattr(ref.attn, field):
            assert_close(
                f"state.{field}", getattr(ref.attn, field), getattr(out.attn, field), 1e-12
            )


@pytest.mark.parametrize("L", PREFIXES)
@pytest.mark.parametrize(("name", "options"), CAUSAL_CASES)
def test_commit_matches_sequential_decoding(name, options, L):
    """Committing an accepted path ≡ feeding its tokens recurrently: same state, same next
    outputs. Deepest path (crosses a group boundary) and a one-token path."""
    layer = tiny_layer(name, **options)
    tree = Tree.from_parents(TREES["random16"])
    nodes, after = _x(len(tree), seed=3, batch=1), _x(3, seed=4, batch=1)
    deepest = int(tree.depths.argmax())
    with torch.no_grad():
        state = _committed(layer, L)
        _, draft = layer.tree_step(nodes, tree, state)
        for node in (deepest, len(tree) - 1):
            path = tree.path(node)
            committed = layer.commit(state, draft, path)
            y_committed, _ = layer(after, state=committed, form="recurrent")
            _, decoded = layer(nodes[:, path], state=state, form="recurrent")
            y_decoded, _ = layer(after, state=decoded, form="recurrent")
            _assert_same_state(decoded, committed)
            assert_close(f"next tokens after path to {node}", y_decoded, y_committed, 1e-10)


LINEAR_CASES = [c for c in CAUSAL_CASES if c.values[0] != "softmax"]


@pytest.mark.parametrize(("name", "options"), LINEAR_CASES)
def test_state_size_is_constant(name, options):
    """State bytes after 10 and after 1000 recurrent steps are identical (1000 = 990 chunked +
    10 recurrent)."""
    layer = tiny_layer(name, **options)
    x = _x(1000, batch=1)
    with torch.no_grad():
        _, short = layer(x[:, :10], form="recurrent")
        _, long = layer(x[:, :990], form="chunk")
        _, long = layer(x[:, 990:], state=long, form="recurrent")
    assert (short.pos, long.pos) == (10, 1000)
    assert short.nbytes() == long.nbytes()
    short_shapes = [t.shape for t in vars(short.attn).values() if isinstance(t, torch.Tensor)]
    long_shapes = [t.shape for t in vars(long.attn).values() if isinstance(t, torch.Tensor)]
    assert short_shapes == long_shapes


def test_softmax_cache_grows_with_context():
    """The control: a KV cache grows by one key and one value per token."""
    layer = tiny_layer("softmax")
    x = _x(20, batch=1)
    with torch.no_grad():
        sizes = [layer(x[:, :T], form="recurrent")[1].nbytes() for T in (10, 20)]
    per_token = 2 * TINY["num_kv_heads"] * (D // TINY["num_heads"]) * 8
    assert sizes == [10 * per_token, 20 * per_token]


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize(("name", "options"), CAUSAL_CASES)
def test_causal(name, options, form):
    """Perturbing x[:, t+1:] leaves y[:, :t+1] unchanged."""
    layer = tiny_layer(name, **options)
    x = _x(17)
    with torch.no_grad():
        y, _ = layer(x, form=form)
        for t in (0, GROUP - 1, GROUP, 8, 15):
            perturbed = x.clone()
            perturbed[:, t + 1 :] = _x(16 - t, seed=t + 10)
            y_perturbed, _ = layer(perturbed, form=form)
            assert_close(f"y[:, :{t + 1}]", y[:, : t + 1], y_perturbed[:, : t + 1], 0)


@pytest.mark.parametrize(("name", "options"), NONCAUSAL_CASES)
def test_noncausal_layers_have_parallel_form_only(name, options):
    layer = tiny_layer(name, **options)
    x = _x(9)
    assert layer.is_causal is False
    y, state = layer(x)
    assert y.shape == x.shape and state is None
    assert_close("auto = parallel", layer(x, form="parallel")[0], y, 0)
    for form in ("chunk", "recurrent"):
        with pytest.raises(ValueError, match=rf"not causal.*form='{form}'"):
            layer(x, form=form)
    with pytest.raises(ValueError, match="not causal"):
        layer.init_state(2, dtype=torch.float64)
    causal_state = tiny_layer("elu").init_state(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not causal.*state"):
        layer(x, state=causal_state)
    with pytest.raises(ValueError, match="not causal.*tree"):
        layer.attend_tree(x[:1, :3], [-1, 0, 0], causal_state)


@pytest.mark.parametrize(("name", "options"), NONCAUSAL_CASES)
def test_noncausal_layers_are_flagged_by_the_leakage_check(name, options):
    report = check_causality(name, length=16, **options)
    assert report.leaks and report.max_change > 1e-3


def test_zero_initialised_augmented_layer_is_local_attention():
    """α = 0 and zero taps: a freshly built augmented layer is its local part alone."""
    kwargs = dict(hidden_size=D, num_heads=4, num_kv_heads=2, size=GROUP, conv_size=4)
    torch.manual_seed(0)
    fresh = build_attention("augmented", conv="causal", **kwargs).double()
    torch.manual_seed(0)
    local = build_attention("augmented", use_global=False, conv="none", **kwargs).double()
    x = _x(13)
    assert_close("fresh = local", local(x)[0], fresh(x)[0], 0)


@pytest.mark.parametrize(
    "options, new",
    [
        ({}, {"alpha", "feature_map.weight"}),
        ({"conv": "causal"}, {"alpha", "conv", "feature_map.weight"}),
        ({"use_global": False, "conv": "causal"}, {"conv"}),
        ({"use_global": False, "conv": "none"}, set()),
    ],
)
def test_every_ablation_has_only_parameters_it_reads(options, new):
    """The local-only ablation has nothing to train in stage 1 (no orphan α)."""
    layer = build_attention("augmented", hidden_size=D, num_heads=4, num_kv_heads=2, **options)
    names = {n for n, _ in layer.named_parameters() if not n.endswith("_proj.weight")}
    assert names == new


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("sink_positions", ["cache", "absolute"])
def test_sinks_stay_at_cache_positions(sink_positions, form):
    """Sinks + window, tokens dropped in between: with cache positions the last outputs do not
    depend on how many tokens were dropped (StreamingLLM); with absolute positions they do."""
    layer = tiny_layer("sliding_window", sink_positions=sink_positions)
    sinks, window, tail = _x(2, seed=1), _x(GROUP + 3, seed=2), GROUP + 3
    outputs = []
    for gap in (4, 40):
        x = torch.cat([sinks, _x(gap, seed=3), window], 1)
        y, _ = layer(x, form=form)
        outputs.append(y[:, -tail + GROUP :])
    same = torch.allclose(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    assert same == (sink_positions == "cache")


@pytest.mark.parametrize(("name", "options"), CAUSAL_CASES)
def test_step_rows_matches_decoding_alone(name, options):
    """Rows at different positions (inside and past the window) stepped together in place ≡
    each row decoded alone; batched where the op has a rows step, row by row otherwise."""
    layer = tiny_layer(name, **options)
    lengths = [0, 3, GROUP + 4, 2 * GROUP + 1]
    alone = [_committed(layer, n) for n in lengths]
    rows = layer.init_rows(2, dtype=torch.float64)  # grows to 4
    for i, state in enumerate(alone):
        if i == 2:
            rows.resize(4)
        rows.put(i, state)
    for step in range(GROUP + 2):
        x = _x(1, seed=10 + step, batch=len(lengths))
        positions = torch.tensor([[s.pos] for s in alone])
        y = layer.step_rows(x, rows, positions)
        for i in range(len(lengths)):
            ref, alone[i] = layer(x[i : i + 1], state=alone[i], form="recurrent")
            assert_close(f"{name} step {step} row {i}", ref, y[i : i + 1], 1e-12)
    sliding = layer.config.kind == "linear" and layer.config.window == "sliding"
    assert rows.batched == sliding


def test_rope_keeps_no_table_that_grows_with_the_position():
    """cos / sin are computed for the positions asked for: rotating at position 10⁶ leaves the
    module's memory as it was, and equals the formula at that position."""
    from linearize.layers.rope import RotaryEmbedding

    rope = RotaryEmbedding(64, 10000.0)

    def nbytes() -> int:
        tensors = [*rope.buffers(), *(v for v in vars(rope).values() if torch.is_tensor(v))]
        return sum(t.numel() * t.element_size() for t in tensors)

    before = nbytes()
    x = torch.randn(1, 2, 3, 64)
    y = rope(x, torch.tensor([10**6, 10**6 + 1]))
    assert nbytes() == before
    angle = torch.tensor([10**6, 10**6 + 1], dtype=torch.float32)[:, None] * rope.inv_freq
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    torch.testing.assert_close(y, rope.rotate(x, cos[:, None], sin[:, None]), rtol=0, atol=0)
