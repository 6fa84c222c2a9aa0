"""``linearize bench serve`` end to end, small: a tiny saved model served in a subprocess."""

from __future__ import annotations

import json

from linearize.cli import main
from tests.generation.conftest import text_model


def test_bench_serve_writes_a_record(tmp_path, capsys):
    model = tmp_path / "tiny"
    text_model("augmented").save(model)
    code = main(
        [
            "bench", "serve", "--model", str(model), "--attention", "none",
            "--streams", "1", "--streams", "2", "--max-tokens", "4", "--prompt-tokens", "8",
            "--system-tokens", "16", "--sessions", "2", "--softmax-context", "0",
            "--out", str(tmp_path / "results"), "--json",
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    measures = [r["measure"] for r in rows]
    assert measures == [
        "aggregate tokens/s",
        "aggregate tokens/s",
        "time to first token",
        "memory, idle sessions",
    ]
    # ignore_eos: every stream runs its full length.
    assert [r["tokens"] for r in rows[:2]] == [4, 8], rows[:2]
    assert rows[3]["states_kept"] == 2 and rows[3]["state_bytes"] > 0, rows[3]
    # The engine the server ran (auto: PyTorch for a float model), on every row.
    assert {r["engine"] for r in rows} == {"torch"} and rows[0]["model"].endswith("(torch)")
    record = json.loads((tmp_path / "results" / "serve.json").read_text())
    assert record["kind"] == "serve"
    assert "--sessions 2" in record["command"], record["command"]


def test_bench_serve_compares_a_model_served_as_loaded_only_with_a_named_original(tmp_path, capsys):
    """``--attention none`` serves the model as loaded: it is not its own softmax original (the
    row would measure it twice under that name); ``--softmax-model`` names one."""
    model, original = tmp_path / "tiny", tmp_path / "original"
    text_model("augmented").save(model)
    text_model("softmax").save(original)
    args = [
        "bench", "serve", "--model", str(model), "--attention", "none", "--streams", "1",
        "--max-tokens", "2", "--prompt-tokens", "4", "--system-tokens", "8", "--sessions", "0",
        "--softmax-context", "16", "--softmax-streams", "1", "--out", str(tmp_path), "--json",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert not any("softmax" in r["model"] for r in rows), rows
    assert main([*args, "--softmax-model", str(original)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[-1]["model"].startswith(f"{original} (softmax"), rows[-1]
