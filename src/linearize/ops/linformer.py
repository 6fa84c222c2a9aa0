"""Linformer attention: keys and values projected along the sequence, then softmax.

``E, F: [k, N]`` mix the ``T ≤ N`` positions into ``k`` landmarks, so every output reads every
position, past and future. It is **not causal**: it has a parallel form only and exists so the
study can show the leakage it causes (``linearize check causality --attention linformer``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def parallel(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor) -> Tensor:
    """``q: [B,T,H,K]``, ``k, v: [B,T,Hkv,·]``, ``E, F: [k, N]`` → ``[B,T,H,V]``."""
    T, R = q.shape[1], q.shape[2] // k.shape[2]
    if E.shape[1] < T:
        raise ValueError(f"linformer was built for at most {E.shape[1]} tokens, got {T}")
    pk = torch.einsum("mt,bthk->bmhk", E[:, :T], k).repeat_interleave(R, 2)
    pv = torch.einsum("mt,bthv->bmhv", F[:, :T], v).repeat_interleave(R, 2)
    scores = torch.einsum("bqhk,bmhk->bhqm", q, pk) / q.shape[-1] ** 0.5
    return torch.einsum("bhqm,bmhv->bqhv", torch.softmax(scores, -1), pv)
