"""The batched rows step ≡ each row's own ``linear_attn.step`` (and the naive definition), with
rows at different positions crossing the window and sink boundaries, joining and leaving."""

from __future__ import annotations

import pytest
import torch

from linearize.ops import linear_attn, linear_attn_rows
from linearize.ops.linear_attn import LinearAttnSpec
from linearize.ops.linear_attn_rows import read_row, step_rows, write_row
from tests.helpers import assert_close

H, HKV, K, FEAT, V = 4, 2, 8, 6, 5
SPECS = {
    "la-norm": LinearAttnSpec(),
    "la-unnorm-decay": LinearAttnSpec(normalize=False, decay=0.9),
    "sliding5-sinks2-shared-decay": LinearAttnSpec(
        size=5, sinks=2, local="softmax", combine="shared", decay=0.9
    ),
    "sliding5-sinks2-softmax+global-norm": LinearAttnSpec(size=5, sinks=2, local="softmax"),
    "sliding4-softmax": LinearAttnSpec(size=4, local="softmax", use_global=False),
    "sliding6-sinks3-softmax": LinearAttnSpec(size=6, sinks=3, local="softmax", use_global=False),
    "sliding5-sinks2-relu2+global": LinearAttnSpec(size=5, sinks=2, local="relu2", decay=0.8),
    "sliding2-shared": LinearAttnSpec(size=2, local="softmax", combine="shared"),
    # The retained cache (ops/retain.py), with and without a half-life, keys un-rotated.
    "sliding5-sinks2-shared-retain3": LinearAttnSpec(
        size=5, sinks=2, local="softmax", combine="shared", decay=0.9, retain=3, retain_halflife=4
    ),
    "sliding4-retain2": LinearAttnSpec(size=4, local="softmax", use_global=False, retain=2),
}
# RoPE frequencies: a retained key is stored un-rotated (the layer passes its own).
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, K, 2, dtype=torch.float64) / K)


def _inv_freq(spec: LinearAttnSpec) -> torch.Tensor | None:
    return INV_FREQ if spec.retain else None


def _token(B: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "q": r(B, H, K),
        "k": r(B, HKV, K),
        "v": r(B, HKV, V),
        "fq": r(B, H, FEAT).abs(),
        "fk": r(B, HKV, FEAT).abs(),
        "q_sink": r(B, H, K),
    }


def _states(spec: LinearAttnSpec, lengths: list[int]) -> list[linear_attn.LinearAttnState]:
    """Batch-1 states after ``lengths`` random tokens (prefilled in the chunk form)."""
    states = []
    for n, length in enumerate(lengths):
        state = linear_attn.init_state(spec, 1, HKV, K, FEAT, V, dtype=torch.float64)
        for t in range(length):
            x = _token(1, 1000 * n + t)
            token = {name: x[name][:, None] for name in ("q", "k", "v", "fq", "fk")}
            _, state = linear_attn.chunk(
                spec,
                **token,
                state=state,
                alpha=0.7,
                q_sink=x["q_sink"][:, None],
                inv_freq=_inv_freq(spec),
            )
        states.append(state)
    return states


def _assert_same_state(name, ref: linear_attn.LinearAttnState, out: linear_attn.LinearAttnState):
    assert (out.n, out.pos) == (ref.n, ref.pos), name
    assert torch.equal(out.times, ref.times), f"{name}: {out.times} != {ref.times}"
    for field in ("S", "z", "k", "fk", "v", "score", "rk", "rv"):
        assert_close(f"{name} {field}", getattr(ref, field), getattr(out, field), 1e-12)
    if ref.rtimes is not None:  # the retained cache, entry by entry (−inf: empty)
        assert torch.equal(out.rtimes, ref.rtimes), f"{name}: {out.rtimes} != {ref.rtimes}"
        empty = ref.rscore.isinf()
        assert torch.equal(out.rscore.isinf(), empty), name
        assert_close(f"{name} rscore", ref.rscore[~empty], out.rscore[~empty], 1e-12)


@pytest.mark.parametrize("spec_id", SPECS)
@pytest.mark.parametrize(
    "lengths",
    [
        [0, 1, 3, 6, 9, 13],  # rows at different positions: inside and past the window
        [2, 0, 1],  # every ring still filling: a step reads only up to the furthest row
    ],
)
def test_rows_step_equals_per_row_step(spec_id, lengths):
    spec = SPECS[spec_id]
    states = _states(spec, lengths)
    rows = linear_attn_rows.init_rows(spec, 8, HKV, K, FEAT, V, dtype=torch.float64)
    nbytes, pointers = rows.row_nbytes(), [t.data_ptr() for t in rows._tensors()]
    for i, state in enumerate(states):
        write_row(spec, rows, i, state)
        _assert_same_state(f"{spec_id} round trip {i}", state, read_row(spec, rows, i))
    B = len(states)
    for step in range(14):
        x = _token(B, 7 + step)
        o, rows = step_rows(spec, **x, rows=rows, alpha=0.7, inv_freq=_inv_freq(spec))
        for i in range(B):
            token = {name: t[i : i + 1] for name, t in x.items()}
            ref, states[i] = linear_attn.step(
                spec, **token, state=states[i], alpha=0.7, inv_freq=_inv_freq(spec)
            )
            assert_close(f"{spec_id} step {step} row {i}", ref, o[i : i + 1], 1e-12)
            _assert_same_state(f"{spec_id} step {step} row {i}", states[i], read_row(spec, rows, i))
    # Fixed size, written in place.
    assert rows.row_nbytes() == nbytes
    assert [t.data_ptr() for t in rows._tensors()] == pointers


@pytest.mark.parametrize(
    "spec_id", ["sliding5-sinks2-shared-decay", "la-norm", "sliding5-sinks2-shared-retain3"]
)
def test_rows_step_equals_naive(spec_id):
    """Two rows decoded from time 0 with a third joining late ≡ the definition on each history."""
    spec = SPECS[spec_id]
    T = 12
    inputs = [_token(1, 100 + r) for r in range(3)]
    history = [{n: [] for n in inputs[0]} for _ in range(3)]
    rows = linear_attn_rows.init_rows(spec, 3, HKV, K, FEAT, V, dtype=torch.float64)
    for step in range(T):
        live = [0, 1] if step < 5 else [0, 1, 2]
        x = {n: torch.cat([_token(1, 1000 * r + step)[n] for r in live]) for n in inputs[0]}
        o, rows = step_rows(spec, **x, rows=rows, alpha=0.7, inv_freq=_inv_freq(spec))
        for j, r in enumerate(live):
            for n in x:
                history[r][n].append(x[n][j])
            seq = {n: torch.stack(history[r][n])[None] for n in x}
            ref = linear_attn.naive(spec, **seq, alpha=0.7, inv_freq=_inv_freq(spec))[:, -1]
            assert_close(f"{spec_id} step {step} row {r}", ref[0], o[j], 1e-12)


def test_rows_join_leave_and_resize():
    spec = SPECS["sliding5-sinks2-shared-decay"]
    states = _states(spec, [3, 8, 11])
    rows = linear_attn_rows.init_rows(spec, 2, HKV, K, FEAT, V, dtype=torch.float64)
    for i in range(2):
        write_row(spec, rows, i, states[i])
    rows = linear_attn_rows.resize_rows(rows, 4)
    assert rows.capacity == 4
    write_row(spec, rows, 2, states[2])
    # Row 0 leaves: the last row moves into its place.
    linear_attn_rows.copy_row(rows, 2, 0)
    x = _token(2, 3)
    o, rows = step_rows(spec, **x, rows=rows)
    for j, i in enumerate([2, 1]):
        token = {name: t[j : j + 1] for name, t in x.items()}
        ref, state = linear_attn.step(spec, **token, state=states[i])
        assert_close(f"row {i}", ref, o[j : j + 1], 1e-12)
        _assert_same_state(f"row {i}", state, read_row(spec, rows, j))


@pytest.mark.parametrize(
    "spec",
    [
        LinearAttnSpec(window="group", size=4),
        LinearAttnSpec(size=1, local="softmax"),
        LinearAttnSpec(size=0, sinks=2),
    ],
    ids=["group", "window1", "sinks-only"],
)
def test_unsupported_specs_are_refused(spec):
    assert not linear_attn_rows.supports_rows(spec)
    with pytest.raises(ValueError, match="no batched rows step"):
        linear_attn_rows.init_rows(spec, 2, HKV, K, FEAT, V)
