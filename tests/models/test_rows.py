"""``forward_rows``: sequences at different positions decoded together ≡ each decoded alone."""

from __future__ import annotations

import pytest
import torch

from linearize.models.decoder import DecodeRows
from linearize.models.state import copy_state, map_batch, row_views, select_rows
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


@pytest.mark.parametrize("kind", KINDS)
def test_decode_rows_join_and_leave_mid_stream(kind):
    """Rows joining (past the capacity, which grows) and leaving between in-place steps: every
    row's logits and state equal its own decoding alone, and a row's bytes stay fixed."""
    model = tiny_model(kind)
    prompts = {
        key: torch.randint(0, 128, (1, n)) for key, n in zip("abcd", (3, 9, 1, 6), strict=True)
    }
    joins, leaves = {"a": 0, "b": 0, "c": 2, "d": 4}, {"a": 5, "c": 7}
    alone, tokens = {}, {}
    rows = DecodeRows(model, capacity=1)
    bytes_per_row = None
    for step in range(10):
        for key, at in joins.items():
            if at == step:
                logits, state = model(prompts[key])
                alone[key] = state
                rows.join(key, model(prompts[key])[1])
                tokens[key] = int(logits[0, -1].argmax())
        for key, at in leaves.items():
            if at == step:
                rows.leave(key)
        keys = list(rows.keys)
        logits = model.step_rows(torch.tensor([[tokens[k]] for k in keys]), rows)
        for i, key in enumerate(keys):
            ref, alone[key] = model(torch.tensor([[tokens[key]]]), state=alone[key])
            assert_close(f"{kind} step {step} row {key}", ref[0], logits[i], 1e-12)
            tokens[key] = int(ref[0, -1].argmax())
        if kind in ("augmented", "elu"):  # no KV cache: fixed bytes
            per_row = rows.nbytes() / len(rows)
            assert bytes_per_row in (None, per_row)
            bytes_per_row = per_row
    assert rows.capacity >= 3 and sorted(rows.keys) == ["b", "d"]
    for key in rows.keys:
        # The state read back continues exactly like the state decoded alone.
        probe = torch.tensor([[7]])
        assert_close(
            f"{kind} state {key}",
            model(probe, state=alone[key])[0],
            model(probe, state=rows.state(key))[0],
            1e-12,
        )


def _tensors(state) -> list[torch.Tensor]:
    """Every batch-first tensor of ``state``, in order."""
    out: list[torch.Tensor] = []
    map_batch(state, lambda t: out.append(t) or t)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_row_views_decode_as_their_rows_without_copying(kind):
    """A batched prefill's rows as views (the server's batched prefill): no copy, and decoding
    one row in place (twice, from its view) leaves the other rows as they were."""
    model = tiny_model(kind)
    _, batched = model(torch.randint(0, 128, (3, 6)))
    views = row_views(batched)
    assert [v.pos for v in views] == [6, 6, 6]
    for i, view in enumerate(views):
        alone = _tensors(select_rows(batched, torch.tensor([i])))
        assert all(torch.equal(a, b) for a, b in zip(alone, _tensors(view), strict=True))
        storage = {t.untyped_storage().data_ptr() for t in _tensors(batched)}
        assert {t.untyped_storage().data_ptr() for t in _tensors(view)} <= storage
    before = _tensors(copy_state(batched))
    ref = copy_state(views[1])
    token = torch.tensor([[5]])
    for _ in range(2):
        want, ref = model(token, state=ref)
        got, views[1] = model(token, state=views[1])
        assert_close(f"{kind} row 1 decoded", want, got, 1e-12)
    for a, b in zip(before, _tensors(batched), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]), f"{kind}: rows 0, 2 moved"
