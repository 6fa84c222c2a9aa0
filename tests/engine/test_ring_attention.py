"""linearize's RingAttention kernel ≡ the step graph's own ops (its reference), and the engine
without it where it cannot be built."""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest
import torch

from linearize.engine import kernels
from linearize.engine.step import KV_GROUP, _softmax_readout, kv_codes, kv_values, uses_kernel
from linearize.engine.tree import Tree
from linearize.models.quantize import quantize
from tests.engine.conftest import KERNEL_BUILDS, engine_model
from tests.helpers import assert_close

pytest.importorskip("onnxruntime")

from linearize.engine.onnx import OnnxEngine  # noqa: E402

BUILT = kernels.unavailable() is None
needs_kernel = pytest.mark.skipif(not BUILT, reason=f"no kernels here: {kernels.unavailable()}")
# fp32 sums in another order (and a polynomial e^x, ~1 ulp) against PyTorch's: measured ≤ 4e-6
# relative at 8,224 slots.
TOLERANCE = 2e-5


def _call(library, q, qs, kb, vb, mask, k, v, window_mask, inwindow, front, retained, scales=None):
    """The kernel on one sequence's arrays; ``scales``: an int8 ring's (keys', values')."""
    _, H, R, K = q.shape
    C = kb.shape[2]
    num = np.zeros((1, H, R, K), np.float32)
    den = np.zeros((1, H, R, 1), np.float32)
    attention = np.zeros((1, H, C + 1), np.float32)
    none = np.zeros(1, np.float32)
    arrays = [q, qs, kb, vb, *(scales or (none, none)), mask, k, v, window_mask, inwindow]
    ring = {np.float32: 0, np.float16: 1, np.int8: 2}[kb.dtype.type]  # (keys and values both)
    sizes = [ctypes.c_int64(n) for n in (H, R, C, K, front, retained, ring)]
    f = ctypes.POINTER(ctypes.c_float)
    done = library.linearize_ring_attention(
        *(np.ascontiguousarray(a).ctypes.data_as(ctypes.c_void_p) for a in arrays),
        *sizes,
        *(a.ctypes.data_as(f) for a in (num, den, attention)),
    )
    assert done == 0
    return num, den, attention


@needs_kernel
@pytest.mark.parametrize(
    "H, R, C, K, front, retained",
    [
        (3, 3, 600, 64, 4, True),  # the default layer's narrow windows: sinks, retained cache
        (3, 3, 8224, 64, 36, True),  # its wide windows at 8k
        (3, 3, 2048, 64, 4, False),  # the shortest ring read in two parts
        (2, 2, 3001, 32, 3, True),  # two unequal parts, the new token in the last
        (3, 3, 77, 64, 0, False),  # a softmax cache
        (2, 4, 37, 16, 2, True),
        (1, 1, 9, 8, 0, False),
        (4, 8, 5, 128, 1, False),
    ],
)
@pytest.mark.parametrize("ring", ["float32", "float16", "int8"])
@pytest.mark.parametrize("build", KERNEL_BUILDS)
def test_kernel_matches_reference(H, R, C, K, front, retained, ring, build, kernel_builds):
    """float16 and int8 rings (Layout.kv_type): the kernel reads them widened (int8 codes times
    their group's scale), against the reference on the same values in float32."""
    if ring == "int8" and K % KV_GROUP:
        pytest.skip(f"int8 rings take head sizes a multiple of {KV_GROUP}")
    library = ctypes.CDLL(kernel_builds[build])
    rng = np.random.default_rng(C)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    q, qs = normal(1, H, R, K, scale=0.3), normal(1, H, R, K, scale=0.3)
    kb, vb, k, v = normal(1, H, C, K), normal(1, H, C, K), normal(1, H, 1, K), normal(1, H, 1, K)
    mask = np.where(rng.random(C) < 0.2, -np.inf, 0).astype(np.float32)  # empty slots
    mask[: min(C, 3)] = -np.inf  # (a masked front, too)
    window_mask = np.zeros(C + 1, np.float32)
    inwindow = np.ones((C + 1, 1), np.float32)
    if retained:
        window_mask[1:front] = -np.inf
        inwindow[1:front] = 0
    scales = None
    if ring == "float16":
        kb, vb = kb.astype(np.float16), vb.astype(np.float16)
    if ring == "int8":
        (kb, ks), (vb, vs) = kv_codes(kb), kv_codes(vb)
        scales = (ks, vs)
    num, den, attention = _call(
        library, q, qs, kb, vb, mask, k, v, window_mask, inwindow, front, int(retained), scales
    )
    if scales is not None:
        kb, vb = kv_values(kb, scales[0]), kv_values(vb, scales[1])
    kb, vb = kb.astype(np.float32), vb.astype(np.float32)
    t = torch.from_numpy
    window = (t(window_mask), t(inwindow)) if retained else (None, None)
    ref = _softmax_readout(t(q), t(qs), t(kb), t(vb), t(mask), t(k), t(v), *window, front)
    assert_close("num", ref[0], torch.from_numpy(num), TOLERANCE)
    assert_close("den", ref[1], torch.from_numpy(den), TOLERANCE)
    if retained:
        assert_close("attention", ref[2], torch.from_numpy(attention), TOLERANCE)
        # A masked slot weighs exactly nothing.
        assert (attention[..., :C][..., mask == -np.inf] == 0).all()


def _engine(model, tmp_path, **options) -> OnnxEngine:
    """An engine of the tests below: fp32 arithmetic, rings growing by 16 slots."""
    return OnnxEngine(
        model,
        max_context=160,
        threads=1,
        cache=tmp_path,
        accuracy="fp32",
        reach_step=16,
        **options,
    )


@needs_kernel
@pytest.mark.parametrize("kind", ["softmax", "retain", "wide_retain", "hybrid"])
def test_step_graph_reads_rings_with_the_kernel(kind, tmp_path):
    """The step graphs (one sequence's, the rows') have one ``RingAttention`` node per softmax
    window, and a sequence steps (crossing the windows' ends, and the rings' growth for
    ``wide_retain``) as with the graph's own ops (the rows' steps against the reference:
    test_onnx.py::test_sequences_stepped_together_step_as_each_alone)."""
    import onnx

    model = engine_model(kind)
    quantize(model, "int4")
    engines = {use: _engine(model, tmp_path, kernels=use) for use in (True, False)}
    kernel, graph = engines[True], engines[False]
    expected = sum(
        uses_kernel(lay, layer.self_attn)
        for lay, layer in zip(kernel.layouts, model.layers, strict=True)
    )
    assert expected and kernel.step_module.kernels and not graph.step_module.kernels
    kernel._step_session("fp32", rows=True)  # the rows' step (the server's) reads them too
    for name in ("step", "rows"):
        (path,) = tmp_path.glob(f"engines/*/{name}-kernels/graph.onnx")
        nodes = onnx.load(path, load_external_data=False).graph.node
        ring = [n for n in nodes if n.op_type == "RingAttention" and n.domain == "linearize"]
        assert len(ring) == expected, name
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (150,)).tolist()
    for engine in engines.values():
        engine.prefill(ids[:5])
    for token in ids[5:]:
        assert_close(f"{kind} step", graph.step(token), kernel.step(token), 1e-4)
    assert kernel.nbytes() == graph.nbytes()


def test_engine_without_a_compiler_runs_the_graph(monkeypatch, caplog, tmp_path):
    """No C++ compiler: the engine says so and steps with the graph's own ops."""
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels._library.cache_clear()
    model = engine_model("retain")
    try:
        with caplog.at_level(logging.INFO, logger="linearize.engine.kernels"):
            engine = OnnxEngine(model, max_context=64, threads=1, cache=tmp_path, accuracy="fp32")
    finally:
        kernels._library.cache_clear()
    assert engine.kernel_library is None and not engine.step_module.kernels
    if kernels.platform.machine().lower() in ("x86_64", "amd64"):
        assert "no C++ compiler found" in caplog.text
    assert list(tmp_path.glob("engines/*/step/graph.onnx"))
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        reference, _ = model(ids)
    engine.prefill(ids[0, :5].tolist())
    steps = torch.stack([engine.step(int(t)).clone() for t in ids[0, 5:]])
    assert_close("steps without the kernel", reference[0, 5:], steps, 1e-4)


@needs_kernel
def test_a_failed_build_is_logged_and_leaves_nothing(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(kernels, "FLAGS", (*kernels.FLAGS, "-DRING_ATTENTION_BROKEN", "-x", "c"))
    kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="linearize.engine.kernels"):
            assert kernels.library(tmp_path) is None
    finally:
        kernels._library.cache_clear()
    assert "runs without linearize's kernels" in caplog.text and "failed" in caplog.text
    assert not list((tmp_path / "kernels").iterdir())  # no half-built folder


@needs_kernel
@pytest.mark.parametrize("intra_op", [1, 2])
def test_sessions_run_the_kernel_from_threads_at_once(intra_op):
    """One session, four threads running it at once (held sequences stepping concurrently: the
    server), its key heads split over onnxruntime's intra-op threads (1 or 2): each run's
    numbers are its own, and the kernel's alone, bit for bit."""
    import concurrent.futures

    import onnxruntime as ort
    from onnx import TensorProto, helper

    H, R, C, K = 3, 3, 4096, 64
    names = ["q", "q_sink", "keys", "values", "mask", "key", "value", "window_mask", "inwindow"]
    shapes = [[1, H, R, K]] * 2 + [[1, H, C, K]] * 2 + [[C], [1, H, 1, K], [1, H, 1, K]]
    shapes += [[C + 1], [C + 1, 1]]
    node = helper.make_node(
        "RingAttention", names, ["num", "den", "attention"], domain="linearize", front=4, retained=1
    )
    graph = helper.make_graph(
        [node],
        "ring",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
            for n, s in zip(names, shapes, strict=True)
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("linearize", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels.library()))
    options.intra_op_num_threads = intra_op
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes, strict=True)}
        for _ in range(8)
    ]
    for feed in feeds:
        feed["mask"][:] = 0
        feed["window_mask"][:] = 0
        feed["inwindow"][:] = 1
    alone = [session.run(None, feed) for feed in feeds]
    library = ctypes.CDLL(str(kernels.library()))
    for feed, want in zip(feeds, alone, strict=True):
        got = _call(library, *(feed[n] for n in names), front=4, retained=1)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            together = list(pool.map(lambda feed: session.run(None, feed), feeds))
            for want, got in zip(alone, together, strict=True):
                for a, b in zip(want, got, strict=True):
                    np.testing.assert_array_equal(a, b)


def _round_like(full: OnnxEngine, rounded: OnnxEngine, layers: list[int]) -> None:
    """Put into ``full``'s float32 rings of ``layers`` the keys and values ``rounded`` holds
    (float16, or int8 codes times their scales), after checking they are the same rows: each
    within its rounding (half a float16 ulp; half an int8 group's scale)."""
    for i in layers:
        for kind in ("k", "v"):
            name = f"{kind}.{i}"
            ring, exact = rounded.state.rings[name], full.state.rings[name]
            if ring.dtype == np.int8:
                scales = rounded.state.scales[name]
                values = kv_values(ring, scales)
                bound = np.repeat(scales, KV_GROUP, -1) * 0.501 + 1e-7
            else:
                values = ring.astype(np.float32)
                bound = np.abs(exact) * 2.0**-11 + 2.0**-25
            assert (np.abs(values - exact) <= bound).all(), f"{name} at {rounded.pos}"
            exact[...] = values


@needs_kernel
@pytest.mark.parametrize("kv_type", ["float16", "int8"])
@pytest.mark.parametrize("kind", ["softmax", "retain", "wide_retain", "hybrid"])
def test_rounded_rings_step_as_float32_rings_of_the_same_values(kind, kv_type, tmp_path):
    """``kv_type``: the rings RingAttention reads hold float16 keys and values, or int8 codes
    with a scale per 32. A sequence steps and verifies trees (crossing the windows' ends,
    retained caches, the rings' growth, folds into ``S, z``) exactly as an engine with float32
    rings whose keys and values are rounded the same way after every step and commit: the
    rings' element type changes nothing but the values they hold."""
    model = engine_model(kind, head_dim=KV_GROUP)  # (int8 rings take groups of 32)
    quantize(model, "int4")
    rounded, full = (_engine(model, tmp_path, kv_type=t) for t in (kv_type, "float32"))
    layers = [i for i, lay in enumerate(rounded.layouts) if lay.kv_type == kv_type]
    assert layers == [
        i for i, (lay, layer) in enumerate(zip(rounded.layouts, model.layers, strict=True))
        if uses_kernel(lay, layer.self_attn)
    ]  # fmt: skip
    assert all(lay.kv_type == "float32" for lay in full.layouts)
    for i in layers:
        assert rounded.state.rings[f"k.{i}"].dtype == rounded.state.rings[f"v.{i}"].dtype
        assert rounded.state.rings[f"k.{i}"].dtype == np.dtype(kv_type)
    assert rounded.nbytes() < full.nbytes()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (150,)).tolist()
    for engine in (rounded, full):
        engine.prefill(ids[:5])
    _round_like(full, rounded, layers)
    tree = Tree.from_parents([-1, 0, 0, 1])
    for n, token in enumerate(ids[5:]):
        if n % 25 == 24:  # a tree pass on the same rings, and its first two nodes committed
            nodes = ids[5 + n : 9 + n]
            logits = [engine.forward_tree(nodes, tree)[0] for engine in (full, rounded)]
            assert torch.equal(*logits), f"{kind}: the tree at {rounded.pos}"
            for engine in (full, rounded):
                engine.commit([0, 1])
        else:
            logits = [engine.step(token) for engine in (full, rounded)]
            assert torch.equal(*logits), f"{kind}: the step at {rounded.pos}"
        _round_like(full, rounded, layers)


@needs_kernel
def test_kv_type_falls_back_and_refuses_what_it_cannot_take(tmp_path):
    """int8 rings take heads a multiple of 32 wide (a scale per 32): narrower heads get
    float16 rings; a type that is not one of KV_TYPES is named."""
    model = engine_model("softmax")  # heads 16 wide
    engine = _engine(model, tmp_path, kv_type="int8")
    assert engine.kv_type == "float16"
    assert {lay.kv_type for lay in engine.layouts} == {"float16"}
    with pytest.raises(
        ValueError, match=r"kv_type='int4'; allowed: \['float32', 'float16', 'int8'\]"
    ):
        _engine(model, tmp_path, kv_type="int4")
