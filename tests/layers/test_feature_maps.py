"""Feature maps: the grouped form (a decode step's fast path) ≡ the map on those heads."""

from __future__ import annotations

import pytest
import torch

from linearize.layers.feature_maps import FEATURE_MAPS, build_feature_map
from tests.helpers import assert_close


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_grouped_equals_per_head(name):
    """``grouped`` on ``[B, Hkv, n, K]`` gives ``forward`` on the same heads in ``per_head``
    order (head ``h`` of a group reads key/value head ``h // n``'s weights)."""
    torch.manual_seed(0)
    B, Hkv, n, K = 2, 3, 4, 16
    feature_map = build_feature_map(name, Hkv, K)
    with torch.no_grad():
        for p in feature_map.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(B, Hkv, n, K)
    expected = feature_map(x.reshape(B, 1, Hkv * n, K)).view(B, Hkv, n, -1)
    assert_close(name, expected, feature_map.grouped(x), 1e-6)
