"""``forward_rows``: sequences at different positions decoded together ≡ each decoded alone."""

from __future__ import annotations

import pytest
import torch

from tests.generation.conftest import KINDS, tiny_model
from tests.helpers import assert_close


@pytest.mark.parametrize("kind", KINDS)
def test_rows_equal_separate_decoding(kind):
    model = tiny_model(kind)
    lengths = (3, 7, 1, 12)  # different positions, across window/group boundaries
    prompts = [torch.randint(0, 128, (1, n)) for n in lengths]
    rows = [model(p)[1] for p in prompts]
    alone = [model(p)[1] for p in prompts]
    tokens = torch.randint(0, 128, (len(lengths), 1))
    for step in range(9):
        # Row 2 leaves after step 4 and comes back after step 6: rows join and leave freely.
        live = [i for i in range(len(lengths)) if not 4 < step < 7 or i != 2]
        logits, states = model.forward_rows(tokens[live], [rows[i] for i in live])
        for j, i in enumerate(live):
            ref, alone[i] = model(tokens[i : i + 1], state=alone[i])
            assert_close(f"{kind} step {step} row {i}", ref[0], logits[j], 1e-12)
            rows[i] = states[j]
            assert rows[i].pos == alone[i].pos
        tokens[live] = logits[:, -1].argmax(-1, keepdim=True)


def test_rows_check_their_input():
    model = tiny_model("augmented")
    state = model(torch.tensor([[1, 2]]))[1]
    with pytest.raises(ValueError, match="one token per state"):
        model.forward_rows(torch.tensor([[1, 2]]), [state])
