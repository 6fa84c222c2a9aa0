"""State buffers that cost memory only where they hold something.

A decoding state is sized for its longest window (the default model: 195 MB, six windows of
8,188 tokens), but a short conversation fills a few slots of it. ``torch.zeros`` writes every
byte, so each new state paid for the whole of it: on this VM ~0.3 s of first-touch page faults
for a 32-token prompt, most of a request's time to first token. Zeros from ``calloc`` (numpy's)
are mapped by the system when first written: a buffer costs the pages its filled slots take, and
nothing to make.
"""

from __future__ import annotations

import numpy as np
import torch

# The dtypes numpy holds (bfloat16 has no numpy dtype: plain torch.zeros).
_NUMPY = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
}


def lazy_zeros(
    *shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """``torch.zeros(*shape, dtype=dtype, device=device)`` whose memory is touched only where
    written (on the CPU; elsewhere, or for a dtype numpy lacks, ``torch.zeros``)."""
    cpu = device is None or torch.device(device).type == "cpu"
    if cpu and dtype in _NUMPY:
        return torch.from_numpy(np.zeros(shape, dtype=_NUMPY[dtype]))
    return torch.zeros(*shape, dtype=dtype, device=device)


def lazy_padded(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """A new tensor: ``x`` followed by zeros along ``dim`` up to ``length`` (``F.pad`` with
    zeros, touching only what ``x`` fills)."""
    out = lazy_zeros(*x.shape[:dim], length, *x.shape[dim + 1 :], dtype=x.dtype, device=x.device)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out
