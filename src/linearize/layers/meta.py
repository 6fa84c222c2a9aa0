"""Modules built on the meta device: a skeleton that the loader gives memory and fills."""

from __future__ import annotations

import torch


def building_on_meta() -> bool:
    """Whether new tensors go to the meta device (``with torch.device("meta")``). A module's
    initial values are pointless there (the loader overwrites the weights and recomputes the
    buffers with ``reset_buffers``), and computing some of them (``eye``, ``pow``, ``div``,
    ``normal_``) on meta tensors imports ``torch._dynamo``: a second of every process that
    loads a model."""
    return torch.empty(0).device.type == "meta"
