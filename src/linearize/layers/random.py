"""A small registry layer with every part active, for checks, tests and benchmarks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linearize.layers.attention import Attention, build_attention
from linearize.seeding import seeded


def random_layer(
    name: str,
    *,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    **options: Any,
) -> Attention:
    """A small layer from the registry with every part exercised.

    α and the convolution taps start at zero and learned feature maps start at the identity, which
    would hide the global part, the convolution and the map's parameters; here they are random.
    The global random state is left untouched.
    """
    with seeded(seed):
        layer = build_attention(
            name,
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            **options,
        ).to(dtype)
        with torch.no_grad():
            if isinstance(layer.alpha, nn.Parameter):
                layer.alpha.uniform_(0.5, 1.5)
            if isinstance(getattr(layer, "conv", None), nn.Parameter):
                layer.conv.normal_(0.0, 0.5)
            if layer.feature_map is not None:
                for p in layer.feature_map.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    return layer
