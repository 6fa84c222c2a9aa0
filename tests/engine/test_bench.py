"""``bench decode`` on the fast engine: rows name their weights and engine."""

from __future__ import annotations

import json

import pytest

from linearize.cli import main
from tests.engine.conftest import engine_model

pytest.importorskip("onnxruntime")


def test_bench_decode_quant_and_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "augmented"
    engine_model("augmented").save(model)
    argv = ["bench", "decode", "--model", str(model), "--contexts", "24,72", "--steps", "4"]
    argv += ["--quant", "none", "--quant", "int4", "--json", "--no-isolate"]
    argv += ["--llama-cpp", "off", "--out", str(tmp_path / "results")]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    engines = {(r["quant"], r["engine"]) for r in rows}
    assert engines == {("none", "torch"), ("int4", "onnx")}
    # The linear model's state is the same size at every context and on either engine.
    assert len({r["state_bytes"] for r in rows}) == 1
    assert all(r["tokens_per_s"] > 0 for r in rows)
