"""The library core of the speculative benchmark, on a tiny model."""

from __future__ import annotations

from linearize.bench.speculative import markdown_table, run_speculative_benchmark
from linearize.generation import MedusaHeads
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
