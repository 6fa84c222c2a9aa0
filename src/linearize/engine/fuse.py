"""Linears that read the same input, fused into one for the exported step.

q, k, v read the same normed token, and so do an MLP's gate and up projections: one matmul with
the weights stacked along the output reads the input once, quantizes its activations once (the
4-bit ``MatMulNBits`` arithmetic) and, with Q4_1's float zero points, shares the group sums of
the offset term, and the graph has a third as many nodes for them. The stacked weights are the
very codes / values of the parts, so the fused output is the parts' outputs concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

from linearize.models.quantize import QUANTS, QuantConfig, QuantizedLinear, QuantizedWeight


def fuse_linears(linears: list[nn.Module], order: torch.Tensor | None = None) -> nn.Module:
    """One module whose output is ``cat([l(x) for l in linears], -1)`` (its features taken in
    ``order``, a permutation): a single linear with the weights stacked, or the parts side by
    side when they cannot be stacked (mixed kinds or quantizations)."""
    first = linears[0]
    has_bias = any(lin.bias is not None for lin in linears)
    if all(type(lin) is nn.Linear for lin in linears):
        N = sum(lin.out_features for lin in linears)
        # (built on the meta device, then given memory: no random init to overwrite)
        dtype = first.weight.dtype
        fused = nn.Linear(first.in_features, N, has_bias, device="meta", dtype=dtype)
        fused = fused.to_empty(device=first.weight.device)
        with torch.no_grad():
            fused.weight.copy_(_rows(torch.cat([lin.weight for lin in linears]), order))
            if has_bias:
                fused.bias.copy_(_rows(torch.cat([_bias(lin) for lin in linears]), order))
        return fused
    weights = [getattr(lin, "qweight", None) for lin in linears]
    if any(w is None for w in weights) or len({(w.bits, w.group_size) for w in weights}) > 1:
        return _SideBySide(linears, order)
    bits, group = weights[0].bits, weights[0].group_size
    quant = next(name for name, b in QUANTS.items() if b == bits)
    N = sum(w.out_features for w in weights)
    stacked = QuantizedWeight(N, weights[0].in_features, QuantConfig(quant, group, quant))
    with torch.no_grad():
        for name in ("codes", "scale", "zero"):
            getattr(stacked, name).copy_(
                _rows(torch.cat([getattr(w, name) for w in weights]), order)
            )
    template = nn.Linear(weights[0].in_features, N, bias=False, device="meta")  # (its sizes)
    fused = QuantizedLinear(template, QuantConfig(quant, group, quant), shared=stacked)
    if has_bias:
        fused.bias = nn.Parameter(_rows(torch.cat([_bias(lin) for lin in linears]), order))
    return fused


def _rows(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return x if order is None else x[order]


class _SideBySide(nn.Module):
    def __init__(self, linears: list[nn.Module], order: torch.Tensor | None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(linears)
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([part(x) for part in self.parts], -1)
        return out if self.order is None else out[..., self.order]


def _bias(linear: nn.Module) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias.detach()
    return torch.zeros(linear.out_features)
