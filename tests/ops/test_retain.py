"""The retained cache's selection against a plain sort: per query, the ``size`` best available
candidates by (score, later time), ties included."""

from __future__ import annotations

import pytest
import torch

from linearize.ops import retain


def _by_sorting(all_score, all_times, available, size):
    """``[B, Hkv, Nq, N]`` scores and availability, ``[B, Hkv, N]`` times → chosen mask."""
    chosen = torch.zeros_like(available)
    B, Hkv, Nq, N = available.shape
    for b in range(B):
        for h in range(Hkv):
            for q in range(Nq):
                ranked = sorted(
                    (i for i in range(N) if available[b, h, q, i]),
                    key=lambda i: (float(all_score[b, h, q, i]), int(all_times[b, h, i])),
                    reverse=True,
                )
                chosen[b, h, q, ranked[:size]] = True
    return chosen


def _case(seed: int, Nq: int = 6, M: int = 3, E: int = 9):
    g = torch.Generator().manual_seed(seed)
    B, Hkv = 1, 2
    # Few distinct scores, so that ties (broken by time) occur.
    rscore = torch.randint(0, 4, (B, Hkv, M), generator=g).double()
    rtimes = torch.randperm(20, generator=g)[:M].expand(B, Hkv, M).clone()
    rtimes[:, 1, -1] = -1  # an empty cache slot
    times = 20 + torch.arange(E)
    return g, B, Hkv, M, E, Nq, rscore, rtimes, times


@pytest.mark.parametrize("seed", range(6))
def test_per_query_selection_is_a_sort(seed):
    g, B, Hkv, M, E, Nq, rscore, rtimes, times = _case(seed)
    score = torch.randint(0, 4, (B, Hkv, Nq, E), generator=g).double()
    eligible = torch.rand(Nq, E, generator=g) < 0.6
    chosen = retain.select_per_query(rtimes, rscore, score, times, eligible, 3)
    all_score = torch.cat([rscore[..., None, :].expand(-1, -1, Nq, -1), score], -1)
    all_times = torch.cat([rtimes, times.expand(B, Hkv, -1)], -1)
    available = torch.cat(
        [(rtimes >= 0)[..., None, :].expand(-1, -1, Nq, -1), eligible.expand(B, Hkv, -1, -1)], -1
    )
    assert torch.equal(chosen, _by_sorting(all_score, all_times, available, 3))


@pytest.mark.parametrize("seed", range(6))
def test_causal_selection_is_a_sort(seed):
    """Consecutive queries: the candidates leave in time order, each query sees a prefix."""
    g, B, Hkv, M, E, Nq, rscore, rtimes, times = _case(seed)
    score = torch.randint(0, 4, (B, Hkv, E), generator=g).double()
    left = torch.sort(torch.randint(0, E + 1, (Nq,), generator=g)).values
    eligible = torch.arange(E)[None, :] < left[:, None]
    chosen = retain.select_causal(rtimes, rscore, score, times, torch.arange(Nq), eligible, 3)
    per_query = score[..., None, :].expand(-1, -1, Nq, -1)
    by_query = retain.select_per_query(rtimes, rscore, per_query, times, eligible, 3)
    assert torch.equal(chosen, by_query)
    all_score = torch.cat([rscore[..., None, :].expand(-1, -1, Nq, -1), per_query], -1)
    all_times = torch.cat([rtimes, times.expand(B, Hkv, -1)], -1)
    available = torch.cat(
        [(rtimes >= 0)[..., None, :].expand(-1, -1, Nq, -1), eligible.expand(B, Hkv, -1, -1)], -1
    )
    assert torch.equal(chosen, _by_sorting(all_score, all_times, available, 3))
