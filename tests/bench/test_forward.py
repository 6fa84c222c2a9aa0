"""``linearize bench forward`` on a tiny saved model, in this process."""

from __future__ import annotations

import json

import pytest

from linearize.bench.forward import ForwardBenchConfig, markdown_table
from linearize.cli import main
from tests.generation.conftest import text_model


def test_bench_forward_rows(tmp_path, capsys):
    model = tmp_path / "tiny"
    text_model("softmax").save(model)
    code = main(
        [
            "bench", "forward", "--model", str(model), "--prefill", "8", "--contexts", "16",
            "--steps", "2", "--no-transformers", "--no-isolate", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["what"], r["model"], r["context"]) for r in rows] == [
        ("prefill", "softmax", 8),
        ("prefill", "augmented", 8),
        ("decode", "softmax", 16),
        ("decode", "augmented", 16),
    ]
    decode = rows[2:]
    assert all(r["ms_per_token"] > 0 and r["state_bytes"] > 0 for r in decode)
    assert all(r["peak_rss_bytes"] > 0 for r in rows)
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1


def test_bench_forward_refuses_bad_contexts():
    with pytest.raises(ValueError, match="contexts"):
        ForwardBenchConfig(contexts="0").validate()
