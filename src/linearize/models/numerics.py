"""Numerical guards: NaN/inf in weights (at load) or in activations (at every forward pass).

A model whose weights hold NaN (or values so large that a norm overflows and outputs zeros)
would otherwise answer with confident garbage (token 0 forever, perplexity ``nan``) and exit 0.
Weights are checked once when loaded, naming the tensor; a forward pass checks each layer's
output and the logits, naming the first layer that broke. Training's divergence guard
(``train.trainer.TrainingDiverged``) is a kind of the same error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class NonFiniteError(RuntimeError):
    """NaN or inf appeared in a model's activations."""


def check_finite_weights(weights: dict[str, Tensor], source: str) -> None:
    """Raise ``ValueError`` naming the first floating-point tensor that holds NaN or inf."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(
                    f"{source}: tensor {name!r} holds {bad} non-finite values (NaN or inf) out "
                    f"of {tensor.numel()}; the checkpoint is corrupt"
                )


def finite_flag(x: Tensor, normalized: bool = False) -> Tensor:
    """A 0-dim bool tensor, True when ``x`` is all finite (no device sync: checked later).

    ``normalized``: ``x`` goes through an RMS/LayerNorm next, whose sum of squares over the last
    dimension overflows (and silently outputs zeros) once ``|x|`` reaches ``sqrt(max / D)``; such
    values count as broken too (|x| >= 7.7e17 in float32 at D = 576)."""
    limit = torch.finfo(x.dtype).max
    if normalized:
        # Norms of 16-bit tensors accumulate in float32.
        limit = (max(limit, torch.finfo(torch.float32).max) / x.shape[-1]) ** 0.5
    # NaN compares False, so one reduction catches NaN, inf and overflow.
    return x.detach().abs().amax() < limit


def raise_if_non_finite(
    flags: Sequence[Tensor], names: Callable[[], Sequence[str]], positions: Callable[[], str]
) -> None:
    """One sync for a whole forward pass: ``flags[i]`` says whether step ``names()[i]`` of it
    produced finite values; raise :class:`NonFiniteError` naming the first that did not. The
    names and positions are only built then (this runs at every decode step)."""
    ok = torch.stack(list(flags))
    if bool(ok.all()):
        return
    first = int((~ok).nonzero()[0])
    raise NonFiniteError(
        f"non-finite values (NaN, inf, or too large to normalize) in the output of "
        f"{names()[first]} at positions {positions()}: the model's weights (or its state) are "
        "broken, so its output would be garbage"
    )
