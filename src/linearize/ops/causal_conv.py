"""Causal depthwise convolution on V (the augmented layer's third part).

``conv_t = Σ_{j=0}^{P-1} w[h, j] · v_{t-j}``: ``P`` causal taps per query head, shared across the
head's channels, ``v_{<0} = 0``. ``v: [B, T, Hkv, V]``, ``w: [H, P]`` (query head ``h`` reads
value head ``h // (H // Hkv)``), output ``[B, T, H, V]``. Causality is structural: the input is
left-padded with the state's tail of the last ``P - 1`` values, never masked. The state
``tail: [B, Hkv, P-1, V]`` has a fixed size.

``symmetric`` is the encoder-style convolution the paper warns about (padded on both sides, so
output ``t`` reads ``v_{t+j}``): parallel only, kept so the leakage check has something to flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops.tree import Tree


def init_state(
    batch_size: int,
    num_kv_heads: int,
    value_dim: int,
    num_taps: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    return torch.zeros(
        batch_size, num_kv_heads, num_taps - 1, value_dim, dtype=dtype, device=device
    )


def _apply_taps(windows: Tensor, w: Tensor) -> Tensor:
    """``windows: [B, T, Hkv, V, P]`` (index j = value at t - j) · ``w: [H, P]`` → ``[B,T,H,V]``."""
    B, T, Hkv, V, P = windows.shape
    taps = w.view(Hkv, -1, P)
    return torch.einsum("bthvp,hrp->bthrv", windows, taps).reshape(B, T, -1, V)


def parallel(v: Tensor, w: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """All ``T`` outputs at once: left-pad with the tail, depthwise ``conv1d``, no padding."""
    B, T, Hkv, V = v.shape
    H, P = w.shape
    if T == 0:
        return v.new_zeros(B, 0, H, V), tail
    padded = torch.cat([tail.transpose(1, 2), v], 1)  # [B, P-1+T, Hkv, V]
    new_tail = padded[:, padded.shape[1] - (P - 1) :].transpose(1, 2)
    if T == 1:
        return _step(padded, w), new_tail
    if not (torch.is_grad_enabled() and (v.requires_grad or w.requires_grad)):
        # Inference: a depthwise conv1d (a correlation, so the taps are flipped).
        x = padded.permute(0, 2, 3, 1).repeat_interleave(H // Hkv, 1).reshape(B, H * V, -1)
        weight = w.flip(-1).repeat_interleave(V, 0)[:, None, :].to(v.dtype)
        out = F.conv1d(x, weight, groups=H * V)  # [B, H*V, T]
        return out.view(B, H, V, T).permute(0, 3, 1, 2), new_tail
    # Training: a sum of P shifted slices, whose backward is cheap (a depthwise conv1d over
    # H·V channels is many times slower to differentiate on CPU).
    taps = w.view(Hkv, H // Hkv, P)
    out = None
    for j in range(P):
        term = padded[:, P - 1 - j : P - 1 - j + T, :, None, :] * taps[:, :, j, None]
        out = term if out is None else out + term
    return out.reshape(B, T, H, V), new_tail


def _step(window: Tensor, w: Tensor) -> Tensor:
    """``window: [B, P, Hkv, V]`` (oldest first) → the newest output ``[B, 1, H, V]``."""
    B, P, Hkv, V = window.shape
    taps = w.flip(-1).view(Hkv, -1, P)
    return torch.einsum("bphv,hrp->bhrv", window, taps).reshape(B, 1, -1, V)


def recurrent(v: Tensor, w: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """One step per token on the fixed tail buffer (the decoding form)."""
    if v.shape[1] == 1:  # the decoding hot path: no list, no concatenation
        return parallel(v, w, tail)
    outputs = [v.new_zeros(v.shape[0], 0, w.shape[0], v.shape[-1])]
    for t in range(v.shape[1]):
        o, tail = parallel(v[:, t : t + 1], w, tail)
        outputs.append(o)
    return torch.cat(outputs, 1), tail


chunk = parallel


def tree(v: Tensor, w: Tensor, tail: Tensor, *, tree: Tree) -> tuple[Tensor, Tensor]:
    """The unfolded convolution: each node's taps follow its ancestor chain, not flat order.

    Node ``i``'s tap ``j`` reads its ancestor at depth ``δ_i − j`` when ``j ≤ δ_i``, else the
    committed value at time ``L − (j − δ_i)`` (tail slot ``P − 1 − (j − δ_i)``; zero before the
    sequence start). Returns the tail unchanged: commit the accepted path with :func:`parallel`.
    """
    return tree_taps(v, w, tail, tree_index(tree, w.shape[1]).to(v.device)), tail


def tree_index(tree: Tree, num_taps: int) -> Tensor:
    """``[N, P]``: where node ``i``'s tap ``j`` reads in ``cat(tail, v)`` (see :func:`tree`)."""
    P = num_taps
    depths = tree.depths[:, None]
    d = depths - torch.arange(P)[None, :]  # [N, P] depth of the node each tap reads (<0: committed)
    node = tree.chain.gather(1, d.clamp(0, tree.chain.shape[1] - 1))
    # d >= -(P-1), so committed taps always land inside the tail (zeros before the start).
    return torch.where(d >= 0, P - 1 + node, P - 1 + d)


def tree_taps(v: Tensor, w: Tensor, tail: Tensor, index: Tensor) -> Tensor:
    """The tree outputs ``[B, N, H, V]`` from the taps' source ``index: [N, P]``."""
    source = torch.cat([tail.transpose(1, 2), v], 1)
    windows = source.index_select(1, index.flatten()).unflatten(1, index.shape)  # [B,N,P,Hkv,V]
    return _apply_taps(windows.permute(0, 1, 3, 4, 2), w)


def symmetric(v: Tensor, w: Tensor) -> Tensor:
    """Encoder-style convolution, padded on both sides: reads the future (parallel only)."""
    P = w.shape[1]
    half = (P - 1) // 2
    padded = torch.nn.functional.pad(v, (0, 0, 0, 0, half, P - 1 - half))
    windows = padded.unfold(1, P, 1).flip(-1)
    return _apply_taps(windows[:, : v.shape[1]], w)


def naive(v: Tensor, w: Tensor) -> Tensor:
    """The definition, tap by tap, from the start of the sequence."""
    B, T, Hkv, V = v.shape
    H, P = w.shape
    vr = v.repeat_interleave(H // Hkv, 2)
    out = torch.zeros(B, T, H, V, dtype=v.dtype, device=v.device)
    for t in range(T):
        for j in range(min(P, t + 1)):
            out[:, t] += w[:, j, None] * vr[:, t - j]
    return out
