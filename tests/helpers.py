"""Test helpers: a relative-error comparison, tiny layers with every part active, random trees."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import Tensor

from linearize.check import random_layer
from linearize.layers import ABLATIONS, ATTENTIONS, Attention, attention_config


def assert_close(name: str, ref: Tensor | None, out: Tensor | None, ratio: float, atol: float = 0):
    """``max|ref − out| / max|ref| <= ratio`` (or ``max|ref − out| <= atol``); prints the error.

    ``None`` (an unused gradient) counts as zeros.
    """
    if ref is None and out is None:
        return
    ref = torch.zeros_like(out) if ref is None else ref
    out = torch.zeros_like(ref) if out is None else out
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = (ref - out).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    error = diff / scale if scale > 0 else diff
    message = f"{name}: abs diff {diff:.3e}, relative error {error:.3e} (ratio {ratio:.1e})"
    assert diff <= atol or error <= ratio, message


# Small sizes that still exercise every part: group/window 5, conv 4 taps, chunks of 6.
TINY = {"hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "chunk_size": 6}
GROUP = 5


def tiny_options(name: str, **options: Any) -> dict[str, Any]:
    preset = {**ATTENTIONS[name], **options}
    small: dict[str, Any] = {}
    if preset.get("size", 0) > 0:
        small["size"] = GROUP
    if preset.get("sinks", 0) > 0:
        small["sinks"] = 2
    if preset.get("conv", "none") != "none":
        small["conv_size"] = 4
    if preset.get("kind") == "linformer":
        small.update(max_length=64, landmarks=8)
    return {**small, **options}


def tiny_layer(name: str, seed: int = 0, **options: Any) -> Attention:
    """A float64 layer (hidden 32, 4 heads, 2 kv heads) with α, taps and feature maps random."""
    return random_layer(name, seed=seed, **{**TINY, **tiny_options(name, **options)})


def _cases() -> list[Any]:
    cases = [pytest.param(name, {}, id=name) for name in ATTENTIONS]
    cases += [
        pytest.param("augmented", dict(options), id=f"augmented[{ablation}]")
        for ablation, options in ABLATIONS.items()
        if options
    ]
    # The retained cache (ops/retain.py) in the shared-denominator layer and the paper's.
    cases += [
        pytest.param("augmented", {"retain": 3}, id="augmented[retain=3]"),
        pytest.param("augmented_paper", {"retain": 2}, id="augmented_paper[retain=2]"),
    ]
    return cases


ALL_CASES = _cases()
CAUSAL_CASES = [c for c in ALL_CASES if attention_config(c.values[0], **c.values[1]).is_causal]
NONCAUSAL_CASES = [
    pytest.param("linformer", {}, id="linformer"),
    pytest.param("augmented", {"conv": "symmetric"}, id="augmented[conv=symmetric]"),
]


def random_parents(num_nodes: int, max_depth: int, seed: int) -> list[int]:
    """A random tree (parents precede children) whose first ``max_depth`` nodes form a chain,
    so its depth is exactly ``max_depth - 1``."""
    rng = random.Random(seed)
    parents, depths = [], []
    for i in range(num_nodes):
        if i < max_depth:
            p = i - 1
        else:
            p = rng.choice([-1] + [j for j in range(i) if depths[j] < max_depth - 1])
        parents.append(p)
        depths.append(0 if p < 0 else depths[p] + 1)
    return parents


# Tree shapes: a chain, a wide shallow tree, a random deep tree, a Medusa-like top-k tree.
TREES = {
    "chain6": [-1, 0, 1, 2, 3, 4],
    "wide": [-1, -1, -1, 0, 0, 1, 2, 3, 3, 5],
    "random16": random_parents(16, 6, seed=1),
    "medusa": [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 7, 9],
}
