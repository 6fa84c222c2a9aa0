"""The leakage check: does any output of an attention layer read a token from its future?

A causal layer's output at position ``t`` depends on ``x[:, :t+1]`` only. The check builds a small
float64 layer with every part active (the zero-initialised α and convolution taps randomised),
runs it on a random sequence, replaces every token after ``t`` with fresh noise, runs it again,
and measures how far the outputs at positions ``<= t`` moved, for several ``t``. Any change beyond
rounding is information leakage (Linformer's sequence projections, an encoder-style convolution
padded on both sides, a global sum that includes the current group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from linearize.layers.config import ATTENTIONS, attention_config, list_attentions
from linearize.layers.random import random_layer


@dataclass(frozen=True)
class CausalityReport:
    """The outcome of :func:`check_causality` for one attention and one form."""

    attention: str
    form: str
    max_change: float
    leaks: bool
    positions: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


def _small_options(name: str, length: int, options: dict[str, Any]) -> dict[str, Any]:
    """Shrink windows, taps and chunks so that ``length`` tokens span several of each."""
    preset = {**ATTENTIONS[name], **options}
    small = dict(options)
    if "size" not in options and preset.get("size", 0) > 0:
        small["size"] = max(1, min(preset["size"], length // 8))
    if "conv_size" not in options and preset.get("conv", "none") != "none":
        small["conv_size"] = max(2, min(preset.get("conv_size", 32), length // 4))
    if "chunk_size" not in options:
        small["chunk_size"] = max(1, length // 4)
    if "max_length" not in options and preset.get("kind") == "linformer":
        small["max_length"] = length
    return small


def _positions(length: int) -> tuple[int, ...]:
    picks = {0, 1, length // 4, length // 2 - 1, length // 2, (3 * length) // 4, length - 2}
    return tuple(sorted(t for t in picks if 0 <= t <= length - 2))


def check_causality(
    name: str,
    *,
    form: str = "parallel",
    length: int = 64,
    seed: int = 0,
    tolerance: float = 1e-9,
    **options: Any,
) -> CausalityReport:
    """Perturb the tokens after ``t`` and measure the change of the outputs up to ``t``.

    ``options`` override the preset (as for ``build_attention``). Unless given, the window/group
    size, convolution taps and chunk size are shrunk so that ``length`` tokens cover several of
    each; causality does not depend on those sizes, but a leak can only show where they are
    smaller than the sequence. Raises ``ValueError`` for an unknown name, a form the layer does
    not have, or ``length < 2``.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 to perturb a future token, got {length}")
    attention_config(name, **options)  # unknown names and options fail here, by name
    options = _small_options(name, length, options)
    layer = random_layer(name, seed=seed, **options)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, layer.config.hidden_size, generator=generator, dtype=torch.float64)
    positions = _positions(length)
    max_change = 0.0
    with torch.no_grad():
        y, _ = layer(x, form=form)
        for t in positions:
            perturbed = x.clone()
            perturbed[:, t + 1 :] = torch.randn(
                perturbed[:, t + 1 :].shape, generator=generator, dtype=torch.float64
            )
            y_perturbed, _ = layer(perturbed, form=form)
            change = (y_perturbed[:, : t + 1] - y[:, : t + 1]).abs().max().item()
            max_change = max(max_change, change)
    return CausalityReport(
        attention=name,
        form=form,
        max_change=max_change,
        leaks=max_change > tolerance,
        positions=positions,
        options=options,
    )


def check_all_causality(
    *, form: str = "parallel", length: int = 64, seed: int = 0, tolerance: float = 1e-9
) -> list[CausalityReport]:
    """:func:`check_causality` for every registry attention, plus the augmented layer with the
    encoder-style symmetric convolution. Non-causal layers have only the parallel form, so they
    are always checked in that form."""
    cases: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in list_attentions()]
    cases.append(("augmented", {"conv": "symmetric"}))
    reports = []
    for name, options in cases:
        causal = attention_config(name, **options).is_causal
        reports.append(
            check_causality(
                name,
                form=form if causal else "parallel",
                length=length,
                seed=seed,
                tolerance=tolerance,
                **options,
            )
        )
    return reports
