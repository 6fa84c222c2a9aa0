"""linearize's MatMul4Bit kernel: its int8 arithmetic (MatMulNBits') and fp32 arithmetic against
numpy, the step graphs' 4-bit linears through it, and the same numbers on any number of threads.
(The engine with it against the PyTorch reference, fp32, every kind: test_onnx.py.)"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import mmap

import numpy as np
import pytest
import torch

from linearize.engine import kernels
from linearize.engine.step import Kernel4Bit
from linearize.models.quantize import QuantConfig, quantize
from linearize.ops.tree import Tree
from tests.engine.conftest import KERNEL_BUILDS, engine_model

pytest.importorskip("onnxruntime")

from linearize.engine.onnx import OnnxEngine  # noqa: E402

needs_kernel = pytest.mark.skipif(
    kernels.unavailable() is not None, reason=f"no kernels here: {kernels.unavailable()}"
)
# fp32 sums in another order than numpy's fp64: measured ≤ 1.5e-7 of the largest output.
TOLERANCE = 2e-6
# (M rows, K, N): the default model's q/k/v, gate/up and down; 18 groups (8 + 8 + 2), an odd
# count, one group; outputs past the last task of 64; one block of 8 rows.
SHAPES = [(1, 576, 960), (1, 576, 3072), (2, 1536, 576), (3, 96, 72), (1, 32, 8), (5, 288, 136)]


def _weight(rng, N, K, whole, half=False):
    """Codes, scales and bases ``−z·s`` (float16 with ``half``) of a random 4-bit weight."""
    G = K // 32
    codes = rng.integers(0, 256, (N, G, 16), dtype=np.uint8)
    scales = (rng.random((N, G)) * 0.02).astype(np.float32)
    zero = rng.integers(0, 16, (N, G)) if whole else rng.random((N, G)) * 15
    bases = (-zero * scales).astype(np.float32)
    dtype = np.float16 if half else np.float32
    return codes, scales.astype(dtype), bases.astype(dtype)


def _dequantized(codes, scales, bases):
    N, G, _ = codes.shape
    q = np.stack([codes & 0x0F, codes >> 4], -1).reshape(N, G, 32).astype(np.float64)
    s, b = (a.astype(np.float64)[..., None] for a in (scales, bases))
    return (q * s + b).reshape(N, G * 32)


def _int8_arithmetic(x, codes, scales, bases):
    """MatMulNBits' int8 arithmetic in numpy: each group of 32 activations as int8 codes
    (scale max|x| / 127, rounded to nearest even), the products with the codes less 8 in
    integers, the offsets ``8·s + b`` on the exact group sums."""
    M, K = x.shape
    N, G, _ = codes.shape
    q = np.stack([codes & 0x0F, codes >> 4], -1).reshape(N, G, 32).astype(np.float64) - 8
    groups = x.reshape(M, G, 32)
    top = np.abs(groups).max(-1, keepdims=True)
    inverse = np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0)
    xq = np.rint(groups * inverse.astype(np.float32)).astype(np.float64)
    dx = (top / np.float32(127)).astype(np.float64)[..., 0]
    s, b = scales.astype(np.float64), bases.astype(np.float64)
    products = np.einsum("ngi,mgi->mng", q, xq) * dx[:, None, :] * s[None]
    return products.sum(-1) + groups.astype(np.float64).sum(-1) @ (8 * s + b).T


def _guarded(a):
    """A copy of ``a`` that ends where an unreadable page begins (a read past its end faults),
    and the mapping that holds it."""
    page = mmap.PAGESIZE
    size = (a.nbytes // page + 2) * page
    held = mmap.mmap(-1, size)
    start = ctypes.addressof(ctypes.c_char.from_buffer(held))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(start + size - page), ctypes.c_size_t(page), 0) == 0
    copy = np.frombuffer(held, a.dtype, a.size, size - page - a.nbytes).reshape(a.shape)
    copy[...] = a
    return copy, held


def _blocks(*arrays):
    """The op's layout (engine.step.rows_in_blocks): ``[N, G, ...]`` → ``[N/8, G, 8, ...]``."""
    return tuple(
        np.ascontiguousarray(a.reshape(a.shape[0] // 8, 8, *a.shape[1:]).swapaxes(1, 2))
        for a in arrays
    )


def _run(x, codes, scales, bases, int8, library=None, N=None):
    """The kernel on ``codes, scales, bases`` in the op's layout (:func:`_blocks`)."""
    library = ctypes.CDLL(library or str(kernels.library()))
    M, K = x.shape
    N = N or 8 * codes.shape[0]
    y = np.full((M, N), np.nan, np.float32)
    pointer = ctypes.c_void_p
    done = library.linearize_matmul_4bit(
        x.ctypes.data_as(pointer),
        *(ctypes.c_int64(n) for n in (M, K, N)),
        *(a.ctypes.data_as(pointer) for a in (codes, scales, bases)),
        ctypes.c_int64(int(int8)),
        ctypes.c_int64(int(scales.dtype == np.float16)),
        y.ctypes.data_as(pointer),
    )
    assert done == 0
    return y


@needs_kernel
@pytest.mark.parametrize("half", [False, True], ids=["float32-scales", "float16-scales"])
@pytest.mark.parametrize("whole", [False, True], ids=["float-zero-points", "whole-zero-points"])
@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("build", KERNEL_BUILDS)
def test_kernel_matches_its_arithmetic(M, K, N, whole, half, build, kernel_builds):
    library = kernel_builds[build]
    rng = np.random.default_rng(K + N)
    codes, scales, bases = _weight(rng, N, K, whole, half)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[0, :32] = 0  # (a group of zeros: scale 0)
    exact = x.astype(np.float64) @ _dequantized(codes, scales, bases).T
    blocks = _blocks(codes, scales, bases)
    fp32 = _run(x, *blocks, int8=False, library=library)
    assert np.abs(fp32 - exact).max() <= TOLERANCE * np.abs(exact).max()
    want = _int8_arithmetic(x, codes, scales, bases)
    int8 = _run(x, *blocks, int8=True, library=library)
    assert np.abs(int8 - want).max() <= TOLERANCE * np.abs(want).max()
    # The weight's arrays each end at an unreadable page: no read past them.
    guarded = [_guarded(a) for a in blocks]
    for int8_arithmetic, result in ((False, fp32), (True, int8)):
        again = _run(x, *(copy for copy, _ in guarded), int8=int8_arithmetic, library=library)
        np.testing.assert_array_equal(again, result)
    # (int8 activations: ~0.4 % of the largest output away from the exact product)
    assert np.abs(int8 - exact).max() <= 2e-2 * np.abs(exact).max()


def _session(threads, N=1000, K=576, int8=True, half=False):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    codes, scales, bases = _blocks(*_weight(np.random.default_rng(0), N, K, whole=False, half=half))
    node = helper.make_node(
        "MatMul4Bit",
        ["x", "codes", "scales", "bases"],
        ["y"],
        domain="linearize",
        accuracy_level=4 if int8 else 0,
    )
    graph = helper.make_graph(
        [node],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(a, n)
            for a, n in zip((codes, scales, bases), node.input[1:], strict=True)
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("linearize", 1)]
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels.library()))
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    return ort.InferenceSession(model, options, ["CPUExecutionProvider"]), (codes, scales, bases)


@needs_kernel
@pytest.mark.parametrize("half", [False, True], ids=["float32-scales", "float16-scales"])
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "fp32"])
def test_threads_give_the_same_numbers(int8, half):
    """The outputs split over onnxruntime's intra-op threads (1, 2, 4) and a session run from
    four threads at once: every output as the kernel alone computes it, bit for bit (float16
    scales and bases: onnxruntime picks the op's float16 form by its inputs' types)."""
    x = np.random.default_rng(5).standard_normal((3, 576)).astype(np.float32)
    outputs = []
    for threads in (1, 2, 4):
        session, weight = _session(threads, int8=int8, half=half)
        outputs.append(session.run(None, {"x": x})[0])
    alone = _run(x, *weight, int8=int8)
    for y in outputs:
        np.testing.assert_array_equal(y, alone)
    rng = np.random.default_rng(6)
    feeds = [rng.standard_normal((1 + i % 2, 576)).astype(np.float32) for i in range(8)]
    want = [_run(f, *weight, int8=int8) for f in feeds]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda f: session.run(None, {"x": f})[0], feeds))
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


def _nodes(engine, name):
    import onnx

    graphs = sorted(engine._graphs[0].glob(f"*/{name}/graph.onnx"))  # (as exported)
    assert len(graphs) == 1, graphs
    return [node.op_type for node in onnx.load(graphs[0], load_external_data=False).graph.node]


@needs_kernel
def test_step_graphs_run_every_4bit_linear_with_the_kernel(tmp_path):
    """The step and rows graphs of an int4 model hold one ``MatMul4Bit`` per linear (q/k/v and
    gate/up fused, o, down), the same graph for Q4_1's float zero points (no offset term beside
    it; float16 scales and bases) as for whole ones, and the 8-bit head as ``MatMul8Bit``; the
    tree graphs keep ``MatMulNBits``; an int8 model's step has one ``MatMul8Bit`` per linear
    and the head, no ``MatMul4Bit``."""
    layers = engine_model("augmented").config.num_layers
    counts = {}
    for zero_points in ("float", "integer"):
        model = engine_model("augmented")
        quantize(model, QuantConfig("int4", zero_points=zero_points))
        engine = OnnxEngine(model, max_context=64, threads=1, cache=tmp_path / zero_points)
        engine.prefill([3, 4, 5])
        engine.step(6)
        rows = engine.rows()
        with torch.no_grad():
            for key, prompt in (("a", [3, 4, 5]), ("b", [9, 8])):
                rows.add(key, engine.hold(model.prefill(torch.tensor([prompt]))[1]))
        engine.step_rows(rows, [7, 7])
        engine.forward_tree([6, 7], Tree.from_parents([-1, 0]))
        for graph in ("step-kernels", "rows-kernels"):
            nodes = _nodes(engine, graph)
            assert nodes.count("MatMul4Bit") == 4 * layers, graph
            assert nodes.count("MatMul8Bit") == 1, graph  # the head
            assert "MatMulNBits" not in nodes, graph
            counts[zero_points, graph] = collections.Counter(nodes)
        assert "MatMul4Bit" not in _nodes(engine, "chain2")
        assert "MatMulNBits" in _nodes(engine, "chain2")
        kernel_linears = [m for m in engine.step_module.modules() if isinstance(m, Kernel4Bit)]
        assert len(kernel_linears) == 4 * layers
        # Q4_1's grid on float16 values: the op reads float16 scales and bases (20 bytes a
        # group); whole zero points' scales are float32
        half = torch.float16 if zero_points == "float" else torch.float32
        assert {(m.scales.dtype, m.bases.dtype) for m in kernel_linears} == {(half, half)}
    for graph in ("step-kernels", "rows-kernels"):
        assert counts["float", graph] == counts["integer", graph], graph

    model = engine_model("augmented")
    quantize(model, QuantConfig("int8"))
    engine = OnnxEngine(model, max_context=64, threads=1, cache=tmp_path / "int8")
    engine.prefill([3, 4, 5])
    engine.step(6)
    nodes = _nodes(engine, "step-kernels")
    assert "MatMul4Bit" not in nodes and "MatMulNBits" not in nodes
    assert nodes.count("MatMul8Bit") == 4 * layers + 1


@needs_kernel
def test_kernel_refuses_rows_not_in_blocks_of_8():
    codes, scales, bases = _weight(np.random.default_rng(0), 8, 64, whole=True)
    with pytest.raises(AssertionError):  # (the entry returns 1: N = 12)
        _run(np.ones((1, 64), np.float32), *_blocks(codes, scales, bases), int8=True, N=12)
