"""linearize's MatMul8Bit kernel (8-bit codes on Q8_0's grid: an int4 model's head, an int8
model's every linear): its int8 arithmetic (MatMulNBits') and fp32 arithmetic against numpy, on
both builds, and the same numbers on any number of threads. (The engine with it against the
PyTorch reference: test_onnx.py; its graphs: test_matmul_4bit.py.)"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from linearize.engine import kernels
from tests.engine.conftest import KERNEL_BUILDS
from tests.engine.test_matmul_4bit import TOLERANCE, _guarded, needs_kernel

pytest.importorskip("onnxruntime")

# (M rows, K, N): the default model's head (a slice of its 49,152 rows) and linears; 18 groups
# (8 + 8 + 2), an odd count, one group; outputs past the last task of 64; one block of 8.
SHAPES = [(1, 576, 3000), (2, 1536, 576), (3, 96, 72), (1, 32, 8), (5, 288, 136)]


def _weight(rng, N, K):
    """Codes 1..255 (quantize's symmetric grid around 128) and float32 scales."""
    codes = rng.integers(1, 256, (N, K // 32, 32), dtype=np.uint8)
    scales = (rng.random((N, K // 32)) * 0.02).astype(np.float32)
    return codes, scales


def _dequantized(codes, scales):
    N, G, _ = codes.shape
    w = (codes.astype(np.float64) - 128) * scales.astype(np.float64)[..., None]
    return w.reshape(N, G * 32)


def _int8_arithmetic(x, codes, scales):
    """MatMulNBits' int8 arithmetic in numpy: each group of 32 activations as int8 codes (scale
    max|x| / 127, rounded to nearest even), the products with the codes less 128 in integers."""
    M, K = x.shape
    N, G, _ = codes.shape
    groups = x.reshape(M, G, 32)
    top = np.abs(groups).max(-1, keepdims=True)
    inverse = np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0)
    xq = np.rint(groups * inverse.astype(np.float32)).astype(np.float64)
    dx = (top / np.float32(127)).astype(np.float64)[..., 0]
    q = codes.astype(np.float64) - 128
    products = np.einsum("ngi,mgi->mng", q, xq) * dx[:, None, :] * scales.astype(np.float64)
    return products.sum(-1)


def _blocks(codes, scales):
    """The op's layout: blocks of 8 rows, each group's 8 rows side by side."""
    N, G, _ = codes.shape
    blocked = codes.reshape(N // 8, 8, G, 32).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocked), np.ascontiguousarray(
        scales.reshape(N // 8, 8, G).transpose(0, 2, 1)
    )


def _run(x, codes, scales, int8, library=None, N=None):
    """The kernel on ``codes, scales`` in the op's layout (:func:`_blocks`)."""
    library = ctypes.CDLL(library or str(kernels.library()))
    M, K = x.shape
    N = N or 8 * codes.shape[0]
    y = np.full((M, N), np.nan, np.float32)
    pointer = ctypes.c_void_p
    done = library.linearize_matmul_8bit(
        x.ctypes.data_as(pointer),
        *(ctypes.c_int64(n) for n in (M, K, N)),
        *(a.ctypes.data_as(pointer) for a in (codes, scales)),
        ctypes.c_int64(int(int8)),
        y.ctypes.data_as(pointer),
    )
    assert done == 0
    return y


@needs_kernel
@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("build", KERNEL_BUILDS)
def test_kernel_matches_its_arithmetic(M, K, N, build, kernel_builds):
    library = kernel_builds[build]
    rng = np.random.default_rng(K + N)
    codes, scales = _weight(rng, N, K)
    codes[0, 0] = [1, 255] * 16  # (the grid's ends: products AVX2's int16 pairs must not clip)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[0, :32] = 0  # (a group of zeros: scale 0)
    if K > 32:
        x[-1, 32:64] = np.where(np.arange(32) % 2, 1, -1)  # (every code ±127)
    exact = x.astype(np.float64) @ _dequantized(codes, scales).T
    blocks = _blocks(codes, scales)
    fp32 = _run(x, *blocks, int8=False, library=library)
    assert np.abs(fp32 - exact).max() <= TOLERANCE * np.abs(exact).max()
    want = _int8_arithmetic(x, codes, scales)
    int8 = _run(x, *blocks, int8=True, library=library)
    assert np.abs(int8 - want).max() <= TOLERANCE * np.abs(want).max()
    # The weight's arrays each end at an unreadable page: no read past them.
    guarded = [_guarded(a) for a in blocks]
    for int8_arithmetic, result in ((False, fp32), (True, int8)):
        again = _run(x, *(copy for copy, _ in guarded), int8=int8_arithmetic, library=library)
        np.testing.assert_array_equal(again, result)
    # (int8 activations: ~0.4 % of the largest output away from the exact product)
    assert np.abs(int8 - exact).max() <= 2e-2 * np.abs(exact).max()


def _session(threads, N=1000, K=576, int8=True):  # (N: 125 blocks of 8)
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    codes, scales = _blocks(*_weight(np.random.default_rng(0), N, K))
    node = helper.make_node(
        "MatMul8Bit",
        ["x", "codes", "scales"],
        ["y"],
        domain="linearize",
        accuracy_level=4 if int8 else 0,
    )
    graph = helper.make_graph(
        [node],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("linearize", 1)]
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels.library()))
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    return ort.InferenceSession(model, options, ["CPUExecutionProvider"]), (codes, scales)


@needs_kernel
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "fp32"])
def test_threads_give_the_same_numbers(int8):
    """The outputs split over onnxruntime's intra-op threads (1, 2, 4): every output as the
    kernel alone computes it, bit for bit."""
    x = np.random.default_rng(5).standard_normal((3, 576)).astype(np.float32)
    for threads in (1, 2, 4):
        session, weight = _session(threads, int8=int8)
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], _run(x, *weight, int8))


@needs_kernel
def test_kernel_refuses_rows_not_in_blocks_of_8():
    codes, scales = _weight(np.random.default_rng(0), 8, 64)
    with pytest.raises(AssertionError):  # (the entry returns 1: N = 12)
        _run(np.ones((1, 64), np.float32), *_blocks(codes, scales), int8=True, N=12)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_blocked_weights_are_the_linears(quant):
    """The kernels' modules give each linear's weight to their ops in blocks of 8 rows; the
    functions' PyTorch forward (what the exporter traces) reads them back as the linear's own
    weight."""
    import torch

    from linearize.engine.step import MatMul4Bit, MatMul8Bit, kernel_linear, rows_in_blocks
    from linearize.models.quantize import quantize
    from tests.engine.conftest import engine_model

    model = quantize(engine_model("augmented"), quant)
    x = torch.randn(3, model.config.hidden_size)
    checked = 0
    for linear in [model.layers[0].mlp.gate_proj, model.layers[1].self_attn.o_proj, model.lm_head]:
        kernel = kernel_linear(linear)
        if hasattr(kernel, "bases"):
            blocks = rows_in_blocks(kernel.codes, kernel.scales, kernel.bases)
            y = MatMul4Bit.apply(x, *blocks, tuple(x.shape))
        else:
            y = MatMul8Bit.apply(x, *rows_in_blocks(kernel.codes, kernel.scales), tuple(x.shape))
        torch.testing.assert_close(y, linear(x), rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 3
