"""Linears fused for the exported step: the parts' outputs side by side, biases included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linearize.engine.fuse import fuse_linears
from linearize.models.quantize import QuantConfig, QuantizedLinear


@pytest.mark.parametrize("quant", [None, "int4", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_output_is_the_parts_side_by_side(quant, bias):
    torch.manual_seed(0)
    parts = [nn.Linear(64, n, bias=bias) for n in (32, 16, 16)]
    if quant is not None:
        parts = [QuantizedLinear(p, QuantConfig(quant)) for p in parts]
        for part, linear in zip(parts, [nn.Linear(64, n) for n in (32, 16, 16)], strict=True):
            part.qweight.set(linear.weight.detach(), QuantConfig(quant))
            if bias:
                part.bias = nn.Parameter(torch.randn(part.out_features))
    order = torch.randperm(64)
    fused = fuse_linears(parts, order)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = torch.cat([p(x) for p in parts], -1)[:, order]
        assert torch.allclose(fused(x), expected, atol=1e-5)
