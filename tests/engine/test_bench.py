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


def test_time_decodes_takes_turns_and_keeps_each_run_its_own_state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from linearize.bench import speed

    model = engine_model("augmented").eval()
    seen = []
    step = speed.ModelDecoding.step

    def recorded(self, timed):
        step(self, timed)
        seen.append((self.context, self.engine, timed, int(self.token)))

    monkeypatch.setattr(speed.ModelDecoding, "step", recorded)
    runs = [(model, 40, "onnx"), (model, 72, "torch")]
    results = speed.time_decodes(runs, steps=12, warmup=2)
    assert [len(r["times"]) for r in results] == [12, 12]
    assert [r["engine"] for r in results] == ["onnx", "torch"]
    # Warm-up steps in turns, then turns of DECODE_TURN timed steps (the last one shorter).
    turns = [(c, timed) for c, _, timed, _ in seen]
    expected = [(40, False), (72, False)] * 2
    expected += [(40, True)] * 8 + [(72, True)] * 8 + [(40, True)] * 4 + [(72, True)] * 4
    assert turns == expected
    # Each run decodes what it decodes alone: turns do not mix the states.
    together = {c: [t for c2, _, _, t in seen if c2 == c] for c in (40, 72)}
    for context, engine in ((40, "onnx"), (72, "torch")):
        seen.clear()
        alone = speed.time_decode(model, context, steps=12, warmup=2, engine=engine)
        assert alone["state_bytes"] == results[0 if context == 40 else 1]["state_bytes"]
        assert [t for *_, t in seen] == together[context]
