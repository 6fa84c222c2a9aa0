"""The retained cache: a few exact tokens per key head kept past the window, chosen by the
attention they received inside it.

A token's **score** is the attention it received while it was local: the local softmax
probabilities (window and sinks, one denominator) summed over the query heads that read its key
head and over every query whose window held it. Sinks score nothing (they never leave). When a
token leaves the window its score is final; the cache keeps the ``M = spec.retain`` tokens with
the largest scores among all that left (ties: the later token), per batch row and key head, and
every query attends to them exactly, in one softmax with its window. The cache has a fixed size
(``M`` keys and values per key head), so decoding memory stays constant.

Why: by oracle, the teacher's attention past the window is the retrieval of a few keys, and the
keys that drew the most attention inside the window are the ones it later retrieves
(docs/results.md, "Which of the teacher's far attention helps").

Positions. With ``inv_freq`` (the layer's RoPE frequencies) a token is stored un-rotated (as if
at position 0) and scored by the sink queries ``q_sink`` (rotated at the query's place in the
kept cache): like a sink, every retained token then sits at the fixed distance ``sinks + size −
1`` however long the sequence, inside the trained range. Without, it is scored by ``q`` at its
true distance.

Cache tensors (``[B, Hkv, M, ·]``): keys ``rk``, values ``rv``, times ``rtimes`` (−1: empty) and
scores ``rscore`` (−inf: empty), in decreasing (score, time) order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.ops import rope


def unrotate(k: Tensor, times: Tensor, inv_freq: Tensor | None) -> Tensor:
    """``k: [..., N, K]`` rotated by RoPE at ``times: [N]`` (or ``[..., N]``) → the same keys at
    position 0 (``k`` itself without ``inv_freq``)."""
    if inv_freq is None:
        return k
    cos, sin = rope.cos_sin(times, inv_freq.to(k.device), k.dtype)
    return rope.rotate(k, cos, -sin)  # the rotation by −angle


def priority(score: Tensor, times: Tensor, halflife: float) -> Tensor:
    """What ranks a token that left: its in-window attention ``score: [..., N]``, or with a
    ``halflife`` (tokens) that attention halved every ``halflife`` tokens of age,
    ``log2(score) + time / halflife``. Every cached score ages at the same rate, so the ranking
    at any later time is this fixed number's: a newer token displaces an older one that drew
    less than twice its attention per ``halflife`` between them, and the cache follows the text
    instead of holding the strongest tokens of its beginning forever."""
    if not halflife:
        return score
    return torch.log2(score) + times.to(score.dtype) / halflife


def _beats(score: Tensor, times: Tensor) -> Tensor:
    """``[..., N, N]``: entry ``[i, j]`` says token ``i`` ranks above token ``j``."""
    s_i, s_j = score[..., :, None], score[..., None, :]
    t_i, t_j = times[..., :, None], times[..., None, :]
    return (s_i > s_j) | ((s_i == s_j) & (t_i > t_j))


def select_causal(
    rtimes: Tensor,
    rscore: Tensor,
    score: Tensor,
    times: Tensor,
    t_q: Tensor,
    eligible: Tensor,
    size: int,
) -> Tensor:
    """Which candidates each of consecutive queries retains.

    Candidates: the cache (``rtimes, rscore: [B, Hkv, M]``), then tokens that leave the window
    during these queries (``score: [B, Hkv, E]`` final, ``times: [E]`` increasing); ``eligible:
    [Nq, E]`` says which have left by each query (a prefix, growing with the query). Returns
    ``[B, Hkv, Nq, M + E]``: the ``size`` best candidates that have left, per query.

    A query's retained set is the top of everything that left before it, which is the top of the
    cache and the candidates that left since: counted with a running sum over the candidates in
    the order they leave, ``O(Nq · (M + E))`` memory.
    """
    B, Hkv, M = rtimes.shape
    all_score = torch.cat([rscore, score], -1)
    all_times = torch.cat([rtimes, times.expand(B, Hkv, -1)], -1)
    beats = _beats(all_score, all_times).to(torch.int32)  # [B, Hkv, M + E, M + E]
    cached = rtimes >= 0
    above = (beats[..., :M, :] * cached[..., None]).sum(-2)  # cache tokens above each candidate
    running = torch.cat([torch.zeros_like(beats[..., :1, :]), beats[..., M:, :].cumsum(-2)], -2)
    left = eligible.sum(-1)  # [Nq]: how many candidates have left by each query
    count = above[..., None, :] + running[..., left, :]  # [B, Hkv, Nq, M + E]
    available = torch.cat(
        [cached[..., None, :].expand(-1, -1, len(t_q), -1), eligible.expand(B, Hkv, -1, -1)], -1
    )
    return available & (count < size)


def select_per_query(
    rtimes: Tensor, rscore: Tensor, score: Tensor, times: Tensor, eligible: Tensor, size: int
) -> Tensor:
    """Like :func:`select_causal` for queries that each see their own past (tree nodes): the
    candidates' scores ``score: [B, Hkv, Nq, E]`` differ per query (each counts the attention of
    its own ancestors), ``eligible: [Nq, E]`` any pattern. ``O(Nq · (M + E)²)``: for small trees."""
    B, Hkv, M = rtimes.shape
    Nq = eligible.shape[0]
    all_score = torch.cat([rscore[..., None, :].expand(-1, -1, Nq, -1), score], -1)
    # The times are every query's: compared once, broadcast over the queries.
    all_times = torch.cat([rtimes, times.expand(B, Hkv, -1)], -1)[..., None, :]
    available = torch.cat(
        [(rtimes >= 0)[..., None, :].expand(-1, -1, Nq, -1), eligible.expand(B, Hkv, -1, -1)], -1
    )
    # The available candidates above each one, counted by a product (exact in floats up to
    # 2^24): in a traced graph one matmul instead of an and, a cast to int64 and a sum.
    beats = _beats(all_score, all_times).to(score.dtype)  # [B, Hkv, Nq, M + E, M + E]
    count = (available.to(score.dtype)[..., None, :] @ beats)[..., 0, :]
    return available & (count < size)


def ranking(times: Tensor, score: Tensor) -> Tensor:
    """The indices of entries ``times, score: [..., N]`` in decreasing (score, time) order: two
    stable sorts, by time then by score, so equal scores keep the later token first."""
    order = torch.argsort(times, dim=-1, descending=True, stable=True)
    by_score = torch.argsort(score.gather(-1, order), dim=-1, descending=True, stable=True)
    return order.gather(-1, by_score)


def merge(
    rk: Tensor,
    rv: Tensor,
    rtimes: Tensor,
    rscore: Tensor,
    k: Tensor,
    v: Tensor,
    times: Tensor,
    score: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cache after the tokens ``k: [B, Hkv, E, K]``, ``v``, ``times: [E]``, ``score: [B,
    Hkv, E]`` left the window: the best ``M`` of both, in decreasing (score, time) order."""
    B, Hkv, M = rtimes.shape
    if k.shape[2] == 0:
        return rk, rv, rtimes, rscore
    all_times = torch.cat([rtimes, times.to(rtimes.device).expand(B, Hkv, -1)], -1)
    all_score = torch.cat([rscore, score.detach()], -1)
    best = ranking(all_times, all_score)[..., :M]

    def pick(x: Tensor) -> Tensor:
        return x.gather(2, best[..., None].expand(-1, -1, -1, x.shape[-1]))

    return (
        pick(torch.cat([rk, k], 2)),
        pick(torch.cat([rv, v], 2)),
        all_times.gather(-1, best),
        all_score.gather(-1, best),
    )
