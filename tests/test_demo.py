"""The main job end to end at a tiny budget on a tiny model, so the pipeline cannot rot."""

from __future__ import annotations

import json

import pytest

from linearize.cli import main
from linearize.demo import DemoConfig
from linearize.demo.pipeline import check_config


def test_demo_smoke_runs_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--out", str(out), "--quant", "none"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity: augmented" in printed and "next:" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["ppl"]) == {"original", "plain", "augmented"}
    assert all(row["ppl"] > 1 for row in report["ppl"].values())
    assert report["speculative"]["medusa"]["identical"]
    assert report["speculative"]["medusa_tree8"]["identical"]
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# linearize demo report")
    assert "| 0 (+2) |" in markdown  # the Medusa heads' accuracy table
    assert "## Perplexity by position" in markdown
    assert set(report["by_position"]) == {"original", "plain", "augmented"}
    for row in report["by_position"].values():
        assert sum(b["tokens"] for b in row["buckets"]) == row["tokens"]
    assert report["seconds"] > 0
    assert (out / "perplexity.png").stat().st_size > 0
    assert (out / "augmented" / "model" / "medusa.safetensors").exists()
    # a rerun reuses every finished step
    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert main(["demo", "--smoke", "--out", str(out), "--quant", "none"]) == 0
    assert sorted(p.name for p in (out / "steps").iterdir()) == steps
    # the time of the steps is kept over reruns, not the few seconds of the rerun
    assert json.loads((out / "report.json").read_text())["seconds"] == report["seconds"]
    assert "done earlier" not in capsys.readouterr().out  # library logs, it does not print
    timed = [r for rows in report["decode"].values() for r in rows if r["supported"]]
    assert timed and {(r["quant"], r["engine"]) for r in timed} == {("none", "torch")}
    # the decode timing on quantized weights and the fast engine (int4 by default): only it
    # runs again
    assert main(["demo", "--smoke", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = [r for rows in report["decode"].values() for r in rows if r["supported"]]
    assert rows and {(r["quant"], r["engine"]) for r in rows} == {("int4", "onnx")}
    assert "(int4, onnx engine)" in (out / "report.md").read_text()
    assert len(list((out / "steps").iterdir())) == len(steps) + 1
    # the time of all steps counts the new decode timing, not the one it replaced
    seconds = json.loads((out / "steps" / "seconds.json").read_text())
    replaced = [name for name in seconds if name.startswith("decode-none-")]
    assert len(replaced) == 1
    expected = sum(v for name, v in seconds.items() if name not in replaced)
    assert report["seconds"] == pytest.approx(expected)


def test_demo_refuses_an_unknown_quant_or_engine():
    with pytest.raises(ValueError, match="quant='int3'"):
        DemoConfig(quant="int3").validate()
    with pytest.raises(ValueError, match="engine='tensorrt'"):
        DemoConfig(engine="tensorrt").validate()


def test_demo_refuses_a_directory_started_with_other_options(tmp_path):
    check_config(tmp_path, DemoConfig())
    with pytest.raises(ValueError, match="budget"):
        check_config(tmp_path, DemoConfig(budget=DemoConfig().budget * 2))


def test_demo_config_rejects_tiny_budget():
    with pytest.raises(ValueError, match="budget"):
        DemoConfig(budget=10).validate()


def test_summary_shows_no_speedup_when_the_planner_chose_plain_decoding():
    from types import SimpleNamespace

    from linearize.demo.report import summary_rows

    def row(tokens_per_s, nodes, reason):
        plan = {"nodes": nodes, "reason": reason}
        return {
            "tokens_per_s": tokens_per_s,
            "mean_accepted": 1.4,
            "identical": True,
            "plan": plan,
            "speculated": nodes > 1,
        }

    report = SimpleNamespace(
        config={"budget": 1024, "attention": "augmented", "plain": "elu"},
        ppl={},
        decode={},
        speculative={
            "plain": {"tokens_per_s": 10.0},
            "medusa": row(34.3, 1, "no tree pays here"),
            "medusa_tree8": row(15.0, 9, "set by the user"),
        },
        seconds=60.0,
    )
    rows = dict(summary_rows(report))
    auto = rows["generation with Medusa (auto tree)"]
    assert "plain decoding chosen (no tree pays here)" in auto and "x)" not in auto
    assert rows["generation with Medusa (8-node tree)"].startswith("15.0 tok/s (1.50x)")
