"""Every form of the linear-attention op ≡ its naive reference, forward and backward."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linearize.ops import linear_attn
from linearize.ops.linear_attn import LinearAttnSpec
from linearize.ops.tree import Tree
from tests.helpers import TREES, assert_close

B, H, HKV, K, FEAT, V = 2, 4, 2, 8, 6, 5
LENGTHS = [1, 7, 63, 64, 65, 130]
GRAD_LENGTHS = [7, 65]


def _specs() -> dict[str, LinearAttnSpec]:
    specs = {
        "la-norm": LinearAttnSpec(),
        "la-unnorm": LinearAttnSpec(normalize=False),
        "la-norm-decay": LinearAttnSpec(decay=0.9),
        "sliding5-shared": LinearAttnSpec(size=5, local="softmax", combine="shared"),
    }
    for G in (5, 8, 64):
        group = dict(window="group", size=G)
        sliding = dict(window="sliding", size=G, sinks=2)
        specs |= {
            f"group{G}-global": LinearAttnSpec(**group, normalize=False),
            f"group{G}-softmax+global": LinearAttnSpec(**group, local="softmax", normalize=False),
            f"group{G}-relu2": LinearAttnSpec(**group, local="relu2", use_global=False),
            f"group{G}-relu2+global-norm": LinearAttnSpec(**group, local="relu2"),
            f"sliding{G}-sinks2-softmax": LinearAttnSpec(
                **sliding, local="softmax", use_global=False
            ),
            f"sliding{G}-sinks2-softmax+global-norm": LinearAttnSpec(**sliding, local="softmax"),
            f"sliding{G}-sinks2-shared-decay": LinearAttnSpec(
                **sliding, local="softmax", combine="shared", decay=0.9
            ),
            f"group{G}-softmax+global-decay": LinearAttnSpec(
                **group, local="softmax", normalize=False, decay=0.8
            ),
        }
    # The retained cache (ops/retain.py): a few exact tokens past the window.
    retained = dict(local="softmax", retain=3)
    specs |= {
        "sliding5-sinks2-shared-decay-retain3": LinearAttnSpec(
            size=5, sinks=2, combine="shared", decay=0.9, **retained
        ),
        "sliding8-retain3": LinearAttnSpec(size=8, use_global=False, **retained),
        "sliding5-sinks2-retain3-halflife8": LinearAttnSpec(
            size=5, sinks=2, use_global=False, retain_halflife=8, **retained
        ),
        "sliding64-sinks2-softmax+global-retain3": LinearAttnSpec(size=64, sinks=2, **retained),
        "group5-softmax+global-retain3": LinearAttnSpec(
            window="group", size=5, normalize=False, **retained
        ),
    }
    return specs


SPECS = _specs()
# RoPE frequencies: retained keys are stored un-rotated (ignored by specs without retain).
ROPE = {"inv_freq": 1.0 / 10000 ** (torch.arange(0, K, 2).float() / K)}
parallel = functools.partial(linear_attn.parallel, **ROPE)
chunk = functools.partial(linear_attn.chunk, **ROPE)
recurrent = functools.partial(linear_attn.recurrent, **ROPE)
FORMS = {
    "parallel": parallel,
    "chunk3": functools.partial(chunk, chunk_size=3),
    "chunk16": functools.partial(chunk, chunk_size=16),
    "chunk64": functools.partial(chunk, chunk_size=64),
    "recurrent": recurrent,
}


def _inputs(T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "q": randn(B, T, H, K).requires_grad_(),
        "k": randn(B, T, HKV, K).requires_grad_(),
        "v": randn(B, T, HKV, V).requires_grad_(),
        # Positive features keep the normaliser away from zero.
        "fq": (1 + F.elu(randn(B, T, H, FEAT))).detach().requires_grad_(),
        "fk": (1 + F.elu(randn(B, T, HKV, FEAT))).detach().requires_grad_(),
        "alpha": torch.tensor(0.7, dtype=torch.float64, requires_grad=True),
        # Queries for the sink keys (rotated at cache positions in the layer).
        "q_sink": randn(B, T, H, K).requires_grad_(),
    }


def _state(spec: LinearAttnSpec) -> linear_attn.LinearAttnState:
    return linear_attn.init_state(spec, B, HKV, K, FEAT, V, dtype=torch.float64)


def _grads(o: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
    grads = torch.autograd.grad((o * do).sum(), list(inputs.values()), allow_unused=True)
    return dict(zip(inputs, grads, strict=True))


@functools.cache
def _reference(spec_id: str, T: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    inputs = _inputs(T)
    o = linear_attn.naive(SPECS[spec_id], **inputs, **ROPE)
    return o.detach(), _grads(o, inputs)


def _args(inputs):
    return [inputs[n] for n in ("q", "k", "v", "fq", "fk")]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("spec_id", SPECS)
def test_form_matches_naive(spec_id, T, form):
    spec = SPECS[spec_id]
    inputs = _inputs(T)
    o, state = FORMS[form](
        spec, *_args(inputs), _state(spec), inputs["alpha"], q_sink=inputs["q_sink"]
    )
    ref, ref_grads = _reference(spec_id, T)
    assert_close(f"{form} o", ref, o, 1e-10, atol=1e-13)
    assert state.pos == T and state.n <= spec.capacity
    if T in GRAD_LENGTHS:
        for name, grad in _grads(o, inputs).items():
            assert_close(f"{form} d{name}", ref_grads[name], grad, 1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "spec_id",
    [
        "sliding64-sinks2-shared-decay",
        "sliding64-sinks2-softmax+global-norm",
        "group8-softmax+global",
    ],
)
def test_pruned_columns_give_the_same_attention(spec_id):
    """``attend(prune=True)`` (the eager forms) scores sinks and global keys only on the columns
    they use: the same output and gradients as the dense computation the graphs trace."""
    spec = SPECS[spec_id]
    g = torch.Generator().manual_seed(3)
    Nq, Nk, R = 9, 150, H // HKV
    t_k = torch.arange(Nk)
    t_q = t_k[-Nq:]
    visible = t_k[None, :] <= t_q[:, None]

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    q, q_sink = randn(B, HKV, R, Nq, K), randn(B, HKV, R, Nq, K)
    k, v = randn(B, HKV, Nk, K), randn(B, HKV, Nk, V)
    fq = (1 + F.elu(randn(B, HKV, R, Nq, FEAT))).detach().requires_grad_()
    fk = (1 + F.elu(randn(B, HKV, Nk, FEAT))).detach().requires_grad_()
    S, z = randn(B, HKV, FEAT, V), (1 + F.elu(randn(B, HKV, FEAT))).detach()
    leaves = [q, q_sink, k, v, fq, fk, S]
    outs = {}
    for prune in (False, True):
        o, _ = linear_attn.attend(
            spec, q, k, v, fq, fk, t_q, t_k, visible, S, z, 0.7,
            s_time=int(t_q[0]), q_sink=q_sink, prune=prune,
        )  # fmt: skip
        grads = torch.autograd.grad(o.square().sum(), leaves, materialize_grads=True)
        outs[prune] = (o, grads)
    assert_close("o", outs[False][0], outs[True][0], 1e-12, atol=1e-14)
    for i, (dense, pruned) in enumerate(zip(outs[False][1], outs[True][1], strict=True)):
        assert_close(f"grad {i}", dense, pruned, 1e-11, atol=1e-13)


def test_chunks_on_a_long_window_prune_and_match_recurrent_decoding():
    """A window longer than ``PRUNE_FROM``: the chunk form prunes, and agrees with the token
    by token form (forward and gradients)."""
    size = linear_attn.PRUNE_FROM + 4
    spec = LinearAttnSpec(size=size, sinks=2, local="softmax", combine="shared", decay=0.99)
    T = 2 * size + 40
    results = {}
    for form in ("chunk64", "recurrent"):
        inputs = _inputs(T, seed=5)
        o, _ = FORMS[form](
            spec, *_args(inputs), _state(spec), inputs["alpha"], q_sink=inputs["q_sink"]
        )
        results[form] = (o, _grads(o, inputs))
    assert_close("o", results["recurrent"][0], results["chunk64"][0], 1e-10, atol=1e-13)
    for name, grad in results["chunk64"][1].items():
        assert_close(f"d{name}", results["recurrent"][1][name], grad, 1e-9, atol=1e-12)


def _assert_same_state(name, ref: linear_attn.LinearAttnState, out: linear_attn.LinearAttnState):
    assert (out.pos, out.n) == (ref.pos, ref.n), name
    assert torch.equal(out.times, ref.times), name
    assert out.nbytes() == ref.nbytes(), name
    for field in ("S", "z", "k", "fk", "v", "score", "rk", "rv"):
        if getattr(ref, field) is None:
            assert getattr(out, field) is None, name
            continue
        assert_close(f"{name} state.{field}", getattr(ref, field), getattr(out, field), 1e-10)
    if ref.rtimes is not None:  # the same tokens retained, with the same scores (−inf: empty)
        assert torch.equal(out.rtimes, ref.rtimes), name
        empty = ref.rtimes < 0
        assert torch.equal(out.rscore[empty], ref.rscore[empty]), name
        assert_close(f"{name} state.rscore", ref.rscore[~empty], out.rscore[~empty], 1e-10)


@pytest.mark.parametrize("form", ["parallel", "chunk3", "recurrent"])
@pytest.mark.parametrize("T", [7, 65])
@pytest.mark.parametrize("spec_id", SPECS)
def test_state_in_pieces(spec_id, T, form):
    """Pieces of 3, 17 and the rest, the state passed along ≡ one pass, outputs and state."""
    spec = SPECS[spec_id]
    inputs = _inputs(T)
    whole, whole_state = FORMS[form](
        spec, *_args(inputs), _state(spec), inputs["alpha"], q_sink=inputs["q_sink"]
    )
    state, outputs = _state(spec), []
    for s, e in [(0, 3), (3, min(20, T)), (20, T)]:
        if s >= e:
            continue
        piece = [x[:, s:e] for x in _args(inputs)]
        sink = inputs["q_sink"][:, s:e]
        o, state = FORMS[form](spec, *piece, state, inputs["alpha"], q_sink=sink)
        outputs.append(o)
    o = torch.cat(outputs, 1)
    ref, ref_grads = _reference(spec_id, T)
    assert_close(f"{form} pieces o", ref, o, 1e-10, atol=1e-13)
    assert_close(f"{form} pieces vs whole", whole, o, 1e-10, atol=1e-13)
    _assert_same_state(form, whole_state, state)
    if T in GRAD_LENGTHS:
        # Gradients flow through the carried state (S, z and the kept buffer).
        for name, grad in _grads(o, inputs).items():
            assert_close(f"{form} pieces d{name}", ref_grads[name], grad, 1e-9, atol=1e-12)


@pytest.mark.parametrize("spec_id", SPECS)
def test_final_state_agrees_across_forms(spec_id):
    spec = SPECS[spec_id]
    inputs = _inputs(65)
    args, alpha, sink = _args(inputs), inputs["alpha"], inputs["q_sink"]
    _, ref = parallel(spec, *args, _state(spec), alpha, q_sink=sink)
    for form in ("chunk16", "recurrent"):
        _, state = FORMS[form](spec, *args, _state(spec), alpha, q_sink=sink)
        _assert_same_state(form, ref, state)


@pytest.mark.parametrize("spec_id", SPECS)
def test_decoding_in_place_matches_and_keeps_the_input_state(spec_id):
    """Without autograd a step writes the token into the buffer's next slot in place: the same
    outputs and final state as the copying step autograd takes, across every window / group
    boundary, and each state stepped from still holds exactly what it held."""
    spec = SPECS[spec_id]
    T = 65
    inputs = _inputs(T)
    ref, ref_state = recurrent(
        spec, *_args(inputs), _state(spec), inputs["alpha"], q_sink=inputs["q_sink"]
    )
    args = [x.detach() for x in _args(inputs)]
    alpha, sink = inputs["alpha"].detach(), inputs["q_sink"].detach()
    state, outputs = _state(spec), []
    for t in range(T):
        held = [x.clone() for x in (*state.kept(), state.S, state.z)]
        token = [x[:, t : t + 1] for x in args]
        o, new = recurrent(spec, *token, state, alpha, q_sink=sink[:, t : t + 1])
        for before, after in zip(held, (*state.kept(), state.S, state.z), strict=True):
            assert torch.equal(before, after), f"step {t} changed its input state"
        outputs.append(o)
        state = new
    assert_close("in place o", ref.detach(), torch.cat(outputs, 1), 1e-12, atol=1e-14)
    _assert_same_state("in place", ref_state, state)


@pytest.mark.parametrize("tree_id", TREES)
@pytest.mark.parametrize("L", [0, 3, 6, 11])
@pytest.mark.parametrize(
    "spec_id",
    [
        "la-norm",
        "la-norm-decay",
        "group5-softmax+global",
        "group5-relu2",
        "group5-softmax+global-decay",
        "sliding5-sinks2-softmax+global-norm",
        "sliding5-sinks2-shared-decay",
        "sliding5-sinks2-shared-decay-retain3",
        "sliding5-sinks2-retain3-halflife8",
        "group5-softmax+global-retain3",
    ],
)
def test_tree_matches_path_decoding(spec_id, L, tree_id):
    """Each node's output ≡ recurrent decoding of its root→node path after the committed prefix."""
    spec = SPECS[spec_id]
    tree = Tree.from_parents(TREES[tree_id])
    N = len(tree)
    prompt, nodes = _inputs(L, seed=2), _inputs(N, seed=3)
    alpha = prompt["alpha"]
    with torch.no_grad():
        state = _state(spec)
        if L:
            _, state = chunk(
                spec, *_args(prompt), state, alpha, chunk_size=4, q_sink=prompt["q_sink"]
            )
        sink = nodes["q_sink"]
        o, same = linear_attn.tree(
            spec, *_args(nodes), state, alpha, tree=tree, q_sink=sink, **ROPE
        )
        assert same is state
        for i in range(N):
            path = [x[:, tree.path(i)] for x in _args(nodes)]
            path_sink = sink[:, tree.path(i)]
            ref, _ = recurrent(spec, *path, state, alpha, q_sink=path_sink)
            assert_close(f"node {i}", ref[:, -1], o[:, i], 1e-10, atol=1e-13)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
def test_pure_linear_attention_matches_fla(normalize):
    """Optional oracle: fla's ``naive_recurrent_linear_attn`` (computes in float32)."""
    pytest.importorskip("einops")
    spec_fla = importlib.util.find_spec("fla")
    if spec_fla is None or not spec_fla.submodule_search_locations:
        pytest.skip("fla (fla-core) is not installed")
    # Load the reference file alone: the package __init__ imports triton, absent on CPU machines.
    path = Path(next(iter(spec_fla.submodule_search_locations))) / "ops/linear_attn/naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_linear_attn_naive", path)
    naive_fla = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(naive_fla)

    spec = LinearAttnSpec(normalize=normalize, eps=1e-10)
    T, Hs = 37, 2
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, T, Hs, K, generator=g), torch.randn(B, T, Hs, K, generator=g)
    v = torch.randn(B, T, Hs, V, generator=g)
    fq, fk = 1 + F.elu(q), 1 + F.elu(k)
    ref, _ = naive_fla.naive_recurrent_linear_attn(fq, fk, v, scale=1.0, normalize=normalize)
    state = linear_attn.init_state(spec, B, Hs, K, K, V)
    o, _ = chunk(spec, q, k, v, fq, fk, state, 1.0, chunk_size=8)
    assert_close("chunk vs fla", ref, o, 1e-5)
    assert_close("naive vs fla", ref, linear_attn.naive(spec, q, k, v, fq, fk), 1e-5)


@pytest.mark.parametrize("form", ["parallel", "chunk3", "recurrent"])
def test_empty_input(form):
    """Zero new tokens: an empty output and the state unchanged."""
    spec = SPECS["group5-softmax+global"]
    inputs = _inputs(0)
    state = _state(spec)
    o, new = FORMS[form](spec, *_args(inputs), state, inputs["alpha"])
    assert o.shape == (B, 0, H, V)
    assert new.pos == 0


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="'gaussian'"):
        LinearAttnSpec(local="gaussian")
    with pytest.raises(ValueError, match="'tiles'"):
        LinearAttnSpec(window="tiles")
    with pytest.raises(ValueError, match="got 0"):
        LinearAttnSpec(window="group", size=0)
    with pytest.raises(ValueError, match="size >= 1"):
        LinearAttnSpec(local="softmax", window="sliding", size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        spec = LinearAttnSpec()
        chunk(spec, *_args(_inputs(4)), _state(spec), 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="retain.*>= 0: -1"):
        LinearAttnSpec(size=4, local="softmax", retain=-1)
    with pytest.raises(ValueError, match="retain=2 needs a softmax window.*local='relu2'"):
        LinearAttnSpec(size=4, local="relu2", retain=2)
    spec = SPECS["sliding8-retain3"]
    with pytest.raises(ValueError, match="use parallel"):
        linear_attn.advance(spec, _state(spec), *(torch.zeros(B, HKV, 1, d) for d in (K, FEAT, V)))


def _one_loud_key(T: int, loud: int) -> dict[str, torch.Tensor]:
    """Inputs where every query attends mostly to the key at time ``loud``."""
    inputs = {name: x.detach() for name, x in _inputs(T, seed=7).items()}
    inputs["q"][:, loud:] = 3.0
    inputs["k"][:, loud] = 3.0
    return inputs


@pytest.mark.parametrize("form", ["parallel", "chunk3", "recurrent"])
def test_retained_cache_keeps_the_key_the_window_attended_to(form):
    """The key that drew the most attention inside the window is retained when it leaves, and
    the queries after read it: their outputs change from the window alone's."""
    spec = LinearAttnSpec(size=4, local="softmax", use_global=False, retain=1)
    T, loud = 20, 5
    inputs = _one_loud_key(T, loud)
    o, state = FORMS[form](spec, *_args(inputs), _state(spec), q_sink=None)
    assert (state.rtimes == loud).all(), state.rtimes
    window_only, _ = FORMS[form](
        LinearAttnSpec(size=4, local="softmax", use_global=False), *_args(inputs), _state(spec)
    )
    # The same as the window alone until the first token leaves (τ = size), not after.
    assert_close("before any token left", window_only[:, :4], o[:, :4], 1e-12)
    assert (o[:, loud + 4 :] - window_only[:, loud + 4 :]).abs().amax(-1).gt(1e-3).all()


def test_retained_cache_breaks_ties_by_the_later_token():
    from linearize.ops import retain

    rk, rv = torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3)
    rtimes, rscore = torch.tensor([[[4, -1]]]), torch.tensor([[[1.0, float("-inf")]]])
    k = v = torch.arange(9.0).view(1, 1, 3, 3)
    times, score = torch.tensor([6, 7, 8]), torch.tensor([[[1.0, 0.5, 2.0]]])
    merged = retain.merge(rk, rv, rtimes, rscore, k, v, times, score)
    assert merged[2].tolist() == [[[8, 6]]]  # 2.0 first, then 1.0 of the later token (6 > 4)
    assert merged[3].tolist() == [[[2.0, 1.0]]]


def _global_output_norms(spec: LinearAttnSpec, lengths: list[int]) -> list[float]:
    """The output norm of one fixed query after ``N`` folded tokens, for each ``N``: random but
    fixed keys, features and values, folded directly into the state 10k tokens at a time."""
    g = torch.Generator().manual_seed(0)
    Hs, Ks, Fs, Vs = 1, 8, 16, 8
    q = torch.randn(1, Hs, Ks, generator=g)
    fq = torch.softmax(torch.randn(1, Hs, Fs, generator=g), -1)
    state = linear_attn.init_state(spec, 1, Hs, Ks, Fs, Vs)
    norms = []
    for N in lengths:
        while state.pos < N:
            T = min(10_000, N - state.pos)
            k = torch.randn(1, Hs, T, Ks, generator=g)
            fk = torch.softmax(torch.randn(1, Hs, T, Fs, generator=g), -1)
            v = 1 + torch.randn(1, Hs, T, Vs, generator=g)
            state = linear_attn.advance(spec, state, k, fk, v)
        token = (q, q[:, :, :Ks], torch.randn(1, Hs, Vs, generator=g), fq, fq[:, :, :Fs])
        o, _ = linear_attn.step(spec, *token, state, alpha=1.0)
        norms.append(float(o.norm()))
    return norms


def test_global_term_is_length_stable():
    """Shared denominator (+ decay): the output stays a convex mix of values from 1k to 100k
    folded tokens; the paper's unnormalised global sum grows with them."""
    lengths = [1_000, 10_000, 100_000]
    window = dict(window="sliding", size=16, sinks=2, local="softmax")
    for decay in (1.0, 0.999):
        spec = LinearAttnSpec(**window, combine="shared", decay=decay)
        norms = _global_output_norms(spec, lengths)
        # Values are 1 + standard normal in 8 dims: a convex mix has norm well below 8.
        assert max(norms) < 8, norms
    paper = _global_output_norms(LinearAttnSpec(**window, normalize=False), lengths)
    assert paper[-1] > 10 * paper[0], paper
