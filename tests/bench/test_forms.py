"""``linearize bench forms`` on tiny lengths, in this process."""

from __future__ import annotations

import json

import pytest

from linearize.bench.forms import FormsBenchConfig, tt_bytes
from linearize.cli import main


def test_bench_forms_rows_table_and_plot(tmp_path, capsys):
    plot, budget = tmp_path / "forms.png", tt_bytes("augmented", "parallel", 8)
    code = main(
        [
            "bench", "forms", "--lengths", "8,16", "--steps", "2", "--no-isolate",
            "--plot", str(plot), "--json", "--max-tt-bytes", str(budget),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["layer"], r["form"], r["T"]) for r in rows] == [
        (layer, form, T)
        for T in (8, 16)
        for layer, form in [
            ("augmented", "parallel"),
            ("augmented", "chunk"),
            ("augmented", "recurrent"),
            ("softmax", "parallel"),
            ("softmax", "recurrent"),
        ]
    ]
    # The augmented parallel form at 16 tokens is over the T×T budget: skipped, with its estimate.
    skipped = [r for r in rows if "skipped" in r]
    assert skipped == [
        {
            "layer": "augmented",
            "form": "parallel",
            "T": 16,
            "skipped": "T×T",
            "tt_bytes": tt_bytes("augmented", "parallel", 16),
        }
    ]
    recurrent = [r for r in rows if r["form"] == "recurrent"]
    assert all(r["state_bytes"] > 0 and r["seconds"] > 0 for r in recurrent)
    assert "| layer | form | T |" in out and plot.stat().st_size > 0


def test_bench_forms_refuses_bad_lengths():
    with pytest.raises(ValueError, match="context"):
        FormsBenchConfig(lengths="8,x").validate()
