"""A transformers ``Cache`` that holds our per-layer decoding state (fixed size for linear layers).

transformers' generation loop only passes the cache around, asks its length, reorders its batch
rows for beam search and (in assisted decoding) crops it. The first three are exact on our
state; cropping would need to undo a recurrent update, so it raises.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from linearize.models.decoder import ModelState
from linearize.models.state import batch_size, select_rows


class LinearizeCache(Cache):
    """``cache.state`` is the model's :class:`ModelState` (``None`` before the first token)."""

    is_compileable = False

    def __init__(self, state: ModelState | None = None) -> None:
        super().__init__(layers=[])
        self.state = state

    def __repr__(self) -> str:
        return f"LinearizeCache(tokens={self.get_seq_length()}, bytes={self.nbytes()})"

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state.layers)

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.pos

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes row ``beam_idx[i]`` (exact: states are per row)."""
        if self.state is not None:
            self.state = select_rows(self.state, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            index = torch.arange(batch_size(self.state)).repeat_interleave(repeats)
            self.state = select_rows(self.state, index)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a linearized model's cache cannot be cropped: its recurrent state cannot forget "
            "tokens, so assisted / speculative decoding through transformers is not supported; "
            "use `linearize generate --speculative medusa|draft|lookup`, which verifies exactly"
        )

    def update(self, *args, **kwargs):
        raise TypeError("LinearizeCache is updated by the model's forward, not per layer")
