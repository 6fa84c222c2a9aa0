"""State buffers touched only where written: the same zeros, without the cost of a whole state."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from linearize.ops.buffers import lazy_padded, lazy_zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_lazy_zeros_are_zeros(dtype):
    x = lazy_zeros(2, 3, 5, dtype=dtype)
    assert x.dtype == dtype and x.shape == (2, 3, 5)
    assert torch.equal(x, torch.zeros(2, 3, 5, dtype=dtype))
    x[0, 0, 0] = 1  # writable, its own memory
    assert torch.equal(lazy_zeros(2, 3, 5, dtype=dtype), torch.zeros(2, 3, 5, dtype=dtype))


def test_lazy_padded_is_a_zero_pad_and_passes_gradients():
    x = torch.randn(1, 3, 7, 4, requires_grad=True)
    padded = lazy_padded(x, 20, 2)
    assert torch.equal(padded, F.pad(x, (0, 0, 0, 13)))
    padded.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_a_big_buffer_costs_only_what_it_holds():
    """400 MB of state buffer with one slot written: a few pages resident (torch.zeros: all)."""
    before = _resident()
    x = lazy_zeros(1, 3, 8192 * 64, 64)  # 402 MB
    x[:, :, :16] = 1.0
    grown = _resident() - before
    assert x.sum() == 3 * 16 * 64
    assert grown < 50e6, grown  # reading the zero pages maps no memory either
    y = lazy_padded(torch.ones(1, 3, 16, 64), 8192 * 64, 2)
    assert _resident() - before - grown < 50e6
    assert torch.equal(x, y)
