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


class _Peer:
    """A stand-in for llama.cpp: a peer whose runs record when they step."""

    label = "peer"

    def __init__(self, seen: list) -> None:
        self.seen, self.measured = seen, []

    def supports(self, context: int) -> bool:
        return context <= 40

    def decoding(self, context: int, span: int):
        seen = self.seen

        class Run:
            times: list = []

            def step(self, timed: bool) -> None:
                seen.append(("peer", context, timed))
                if timed:
                    self.times = [*self.times, 0.001]

            def result(self) -> dict:
                return {"times": self.times}

        return Run()

    def measure(self, context: int, steps: int, warmup: int):
        self.measured.append(context)
        return {"times": [0.002] * steps}, 1

    def row(self, context, result, peak):
        from linearize.bench.speed import DecodeRow

        if result is None:
            return DecodeRow(self.label, context, None, None, None, None, "gguf", "llama.cpp")
        ms = 1000 * result["times"][0]
        return DecodeRow(self.label, context, 1000 / ms, ms, 0, peak, "gguf", "llama.cpp")


def test_bench_decode_peers_take_turns_in_one_process_or_run_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from linearize.bench import speed

    path = tmp_path / "augmented"
    engine_model("augmented").save(path)
    seen = []
    step = speed.ModelDecoding.step

    def recorded(self, timed):
        step(self, timed)
        seen.append(("ours", self.context, timed))

    monkeypatch.setattr(speed.ModelDecoding, "step", recorded)
    peer = _Peer(seen)
    spec = speed.ModelSpec(str(path))
    rows = speed.bench_decode([spec], (40, 72), steps=10, warmup=1, isolate=False, peers=[peer])
    assert [(r.model, r.context) for r in rows] == [
        (str(path), 40),
        (str(path), 72),
        ("peer", 40),
        ("peer", 72),
    ]
    assert rows[3].tokens_per_s is None and rows[2].tokens_per_s == pytest.approx(1000)
    # one warm-up step each, then turns of 8 timed steps, then the last 2 each
    order = [(who, c) for who, c, timed in seen if timed]
    expected = [("ours", 40)] * 8 + [("ours", 72)] * 8 + [("peer", 40)] * 8
    expected += [("ours", 40)] * 2 + [("ours", 72)] * 2 + [("peer", 40)] * 2
    assert order == expected and not peer.measured
    # In fresh processes the peer measures alone, after our rows.
    rows = speed.bench_decode([spec], (40,), steps=2, warmup=0, isolate=True, peers=[peer])
    assert peer.measured == [40] and rows[-1].model == "peer" and rows[-1].peak_rss_bytes == 1
