"""The speculative benchmark (library and ``linearize bench speculative``), on a tiny model."""

from __future__ import annotations

import json

from linearize.bench.speculative import DEFAULT_PROMPTS, markdown_table, run_speculative_benchmark
from linearize.cli import main
from linearize.generation import MedusaHeads, save_heads
from tests.generation.conftest import text_model


def test_rows_and_equality_check():
    model = text_model("hybrid")
    heads = MedusaHeads.from_model(model, num_heads=2, shared_proj=True)
    seen = []
    rows = run_speculative_benchmark(
        model,
        ["Hello there", "Once upon"],
        max_new_tokens=6,
        trees=("tree-2", "auto"),
        draft_layers=(1,),
        heads=heads,
        progress=seen.append,
    )
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("plain", "-"),
        ("medusa", "tree-2"),
        ("medusa", "auto"),
        ("lookup", "auto γ"),
        ("draft", "1 layers, auto γ"),
    ]
    assert all(r["identical"] for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[0]["mean_accepted"] == 1.0
    assert len(seen) == 2
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| medusa | tree-2 |" in table


def test_cli_speculative_record_with_setup(tmp_path, capsys):
    model, heads_dir = tmp_path / "tiny", tmp_path / "heads"
    target = text_model("hybrid")
    target.save(model)
    save_heads(MedusaHeads.from_model(target, num_heads=2, shared_proj=True), heads_dir)
    record = tmp_path / "results" / "spec.json"
    code = main(
        [
            "bench", "speculative", "--model", str(model), "--heads", str(heads_dir),
            "--prompts", "1", "--max-new-tokens", "4", "--trees", "tree-2",
            "--draft-layers", "1", "--no-chat", "--out", str(record),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(record.read_text())
    assert [r["method"] for r in data["rows"]] == ["plain", "medusa", "lookup", "draft"]
    setup = data["extra"]["setup"]
    assert setup["heads"] == "loaded" and setup["prompts"] == [DEFAULT_PROMPTS[0]]
    assert "every method identical" in capsys.readouterr().out


def test_cli_speculative_heads_folder_without_heads(tmp_path, capsys):
    model = tmp_path / "tiny"
    text_model("hybrid").save(model)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["bench", "speculative", "--model", str(model), "--heads", str(empty)])
    assert code == 2
    assert "no Medusa heads there" in capsys.readouterr().err
