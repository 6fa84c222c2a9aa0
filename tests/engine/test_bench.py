"""``bench decode`` on the fast engine: rows name their weights and engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import linearize
from linearize.bench import llama_cpp
from linearize.cli import main
from linearize.models.decoder import PREFILL_SEGMENT
from linearize.models.quantize import weight_bytes
from tests.engine.conftest import engine_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def saved(tmp_path, user_cache):
    """A tiny default ``augmented`` model saved to disk (engine graphs cached in ``tmp_path``)."""
    path = tmp_path / "augmented"
    engine_model("augmented").save(path)
    return path


def test_bench_decode_quant_and_engine(saved, tmp_path, capsys):
    model = saved
    argv = ["bench", "decode", "--model", str(model), "--contexts", "24,72", "--steps", "4"]
    argv += ["--quant", "none", "--quant", "int4", "--json", "--no-isolate"]
    argv += ["--llama-cpp", "off", "--out", str(tmp_path / "results")]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    engines = {(r["quant"], r["engine"]) for r in rows}
    assert engines == {("none", "torch"), ("int4", "onnx")}
    # The linear model's state is the same size at every context on each engine; the onnx
    # engine's holds the retained cache in its rings, whose feature rows and times it leaves
    # unused (test_onnx.test_engine_state_equals_reference_state_size counts them).
    sizes = {
        engine: {r["state_bytes"] for r in rows if r["engine"] == engine} for _, engine in engines
    }
    assert all(len(size) == 1 for size in sizes.values()), sizes
    (torch_bytes,), (onnx_bytes,) = sizes["torch"], sizes["onnx"]
    assert torch_bytes <= onnx_bytes
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # What each step reads: on the torch engine the fp32 model's weights and its state; on the
    # onnx engine the int4 step graph's weights (codes, float16 scales) and its rings (full at
    # 24 tokens: test_onnx.py's read_bytes test fills wider ones).
    read = {(r["engine"], r["context"]): r["read_bytes"] for r in rows}
    fp32 = weight_bytes(linearize.load(str(model)))
    assert read["torch", 24] == read["torch", 72] == fp32 + torch_bytes
    assert read["onnx", 24] == read["onnx", 72] < (fp32 + onnx_bytes) / 2


@pytest.mark.parametrize("kv_type", [None, "float16", "int8"])
def test_bench_decode_kv_type(kv_type, tmp_path, user_cache, capsys):
    """``--kv-type`` reaches the engine, and each row names the keys and values its state
    held: an int4 model's default is float16."""
    path = tmp_path / "augmented"
    engine_model("augmented", head_dim=32).save(path)
    argv = ["bench", "decode", "--model", str(path), "--contexts", "40", "--steps", "4"]
    argv += ["--quant", "int4", "--json", "--no-isolate", "--llama-cpp", "off"]
    assert main(argv + (["--kv-type", kv_type] if kv_type else [])) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["engine"], row["kv_type"]) == ("onnx", kv_type or "float16")


def test_bench_prefill_quant_and_engine(saved, tmp_path, capsys):
    """``bench prefill`` runs an int4 model's prompt on the engine (in chains: 72 tokens, a
    chunk of 64 and one of 8) and names the weights and engine of each row."""
    argv = ["bench", "prefill", "--model", str(saved), "--contexts", "24,72", "--json"]
    argv += ["--quant", "none", "--quant", "int4", "--no-isolate", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["quant"], r["engine"], r["context"]) for r in rows} == {
        (quant, engine, context)
        for quant, engine in (("none", "torch"), ("int4", "onnx"))
        for context in (24, 72)
    }
    assert all(r["seconds"] > 0 and r["state_bytes"] > 0 for r in rows)


def test_bench_decode_option_on_a_saved_model(saved, tmp_path, capsys):
    """``--option`` sets options on a saved model's linear layers (here: its retained cache
    off) and names the rows; with ``--attention`` it goes with the linearization."""
    argv = ["bench", "decode", "--model", str(saved), "--contexts", "24", "--steps", "2"]
    argv += ["--json", "--no-isolate", "--llama-cpp", "off", "--out", str(tmp_path / "r")]
    assert main([*argv, "--option", "retain=0"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["model"] == f"{saved}(retain=0)"
    assert main(argv) == 0
    (default,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["state_bytes"] < default["state_bytes"]  # no cache: no scores, keys, values
    assert main([*argv, "--option", "name=elu"]) == 2
    assert "pass --attention instead" in capsys.readouterr().err


def test_time_decodes_takes_turns_and_keeps_each_run_its_own_state(user_cache, monkeypatch):
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


class _LoggedRun:
    """A decode run that logs each step (who, context, timed, process id) to a file, so runs
    in other processes show the order they stepped in."""

    def __init__(self, log: str, label: str, context: int) -> None:
        if label == "broken":
            raise ValueError("this run cannot start")
        self.log, self.label, self.context, self.times = log, label, context, []
        if label == "peer":  # a peer holding 256 MB, as llama.cpp holds its weights
            self.held = bytearray(b"x" * (256 << 20))

    def step(self, timed: bool) -> None:
        with open(self.log, "a") as f:
            f.write(f"{self.label} {self.context} {int(timed)} {os.getpid()}\n")
        if timed:
            self.times.append(0.001)

    def result(self) -> dict:
        return {"times": self.times}


def _log(path) -> list[tuple[str, int, bool, int]]:
    lines = [line.split() for line in path.read_text().splitlines()]
    return [(who, int(c), timed == "1", int(pid)) for who, c, timed, pid in lines]


class _Peer:
    """A stand-in for llama.cpp whose runs log their steps (:class:`_LoggedRun`)."""

    label = "peer"

    def __init__(self, log) -> None:
        self.log = str(log)

    def supports(self, context: int) -> bool:
        return context <= 40

    def run(self, context: int, span: int):
        return _LoggedRun, (self.log, self.label, context)

    def row(self, context, result, peak):
        from linearize.bench.speed import DecodeRow

        if result is None:
            return DecodeRow(self.label, context, None, None, None, None, "gguf", "llama.cpp")
        ms = 1000 * result["times"][0]
        return DecodeRow(self.label, context, 1000 / ms, ms, 0, peak, "gguf", "llama.cpp")


def test_bench_decode_peers_take_turns_in_one_process(saved, tmp_path, monkeypatch):
    from linearize.bench import speed

    path = saved
    log = tmp_path / "steps.log"
    step = speed.ModelDecoding.step

    def recorded(self, timed):
        step(self, timed)
        with open(log, "a") as f:
            f.write(f"ours {self.context} {int(timed)} {os.getpid()}\n")

    monkeypatch.setattr(speed.ModelDecoding, "step", recorded)
    peer = _Peer(log)
    spec = speed.ModelSpec(str(path))
    rows = speed.bench_decode([spec], (40, 72), steps=10, warmup=1, isolate=False, peers=[peer])
    assert [(r.model, r.context) for r in rows] == [
        (str(path), 40),
        (str(path), 72),
        ("peer", 40),
        ("peer", 72),
    ]
    assert rows[3].tokens_per_s is None and rows[2].tokens_per_s == pytest.approx(1000)
    # one warm-up step each, then turns of 8 timed steps, then the last 2 each, all in here
    steps = _log(log)
    assert {pid for *_, pid in steps} == {os.getpid()}
    order = [(who, c) for who, c, timed, _ in steps if timed]
    expected = [("ours", 40)] * 8 + [("ours", 72)] * 8 + [("peer", 40)] * 8
    expected += [("ours", 40)] * 2 + [("ours", 72)] * 2 + [("peer", 40)] * 2
    assert order == expected
    assert len({r.peak_rss_bytes for r in rows if r.tokens_per_s}) == 1  # this process's


def test_isolated_decodings_take_turns_each_in_its_own_process(tmp_path):
    from linearize.bench.speed import IsolatedDecoding, take_turns

    log = tmp_path / "steps.log"
    runs = [IsolatedDecoding(_LoggedRun, str(log), who, 40) for who in ("a", "b")]
    results = take_turns(runs, steps=10, warmup=1)
    steps = _log(log)
    order = [(who, timed) for who, _, timed, _ in steps]
    expected = [("a", False), ("b", False)] + [("a", True)] * 8 + [("b", True)] * 8
    assert order == expected + [("a", True)] * 2 + [("b", True)] * 2
    pids = {who: {pid for w, _, _, pid in steps if w == who} for who in ("a", "b")}
    assert len(pids["a"]) == len(pids["b"]) == 1 and pids["a"] != pids["b"]
    assert os.getpid() not in pids["a"] | pids["b"]
    assert [len(r["times"]) for r in results] == [10, 10]
    assert all(r["peak_rss_bytes"] > 0 for r in results)
    with pytest.raises(RuntimeError, match="ValueError: this run cannot start"):
        IsolatedDecoding(_LoggedRun, str(log), "broken", 40)


def test_bench_decode_isolated_runs_take_turns_by_context(saved, tmp_path):
    from linearize.bench import speed

    path = saved
    log = tmp_path / "steps.log"
    spec = speed.ModelSpec(str(path))
    seen = []
    rows = speed.bench_decode(
        [spec], (40, 72), steps=2, warmup=0, peers=[_Peer(log)], progress=seen.append
    )
    assert [(r.model, r.context, r.tokens_per_s is None) for r in rows] == [
        (str(path), 40, False),
        (str(path), 72, False),
        ("peer", 40, False),
        ("peer", 72, True),
    ]
    # Our run and the peer's at 40 tokens took turns; then our run at 72, alone.
    assert seen == [
        f"decode @ 40: prefilling {path} (1 of 2)",
        "decode @ 40: prefilling peer (2 of 2)",
        "decode @ 40: 2 runs taking turns, 0 + 2 steps each",
        f"decode @ 72: prefilling {path} (1 of 1)",
        "decode @ 72: 1 run, 0 + 2 steps each",
    ]
    assert {pid for *_, pid in _log(log)} != {os.getpid()}
    # Each row's peak is its own process's: the peer's 256 MB show in its row only.
    assert rows[2].peak_rss_bytes > rows[0].peak_rss_bytes + (200 << 20)
    assert rows[1].peak_rss_bytes < rows[2].peak_rss_bytes - (200 << 20)


def _timed_prefill(label: str, context: int, held_mb: int) -> dict:
    """A peer's prefill (module level: it runs in a fresh process), holding ``held_mb`` MB."""
    held = bytearray(b"x" * (held_mb << 20))
    return {
        "seconds": context / 1000,
        "state_bytes": 2 * context,
        "activation_bytes": len(held),
        "quant": "gguf",
        "engine": label,
    }


class _PrefillPeer:
    label = "peer"

    def prefill(self, context: int):
        return _timed_prefill, (self.label, context, 256)


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "one-process"])
def test_bench_prefill_peers_run_after_each_contexts_models(saved, isolate):
    from linearize.bench import speed

    spec = speed.ModelSpec(str(saved))
    seen = []
    rows = speed.bench_prefill(
        [spec], (24, 40), isolate=isolate, peers=[_PrefillPeer()], progress=seen.append
    )
    assert [(r.model, r.context, r.engine) for r in rows] == [
        (str(saved), 24, "torch"),
        (str(saved), 40, "torch"),
        ("peer", 24, "peer"),
        ("peer", 40, "peer"),
    ]
    assert seen == [f"prefill {saved} @ 24", "prefill peer @ 24"] + [
        f"prefill {saved} @ 40",
        "prefill peer @ 40",
    ]
    peer = rows[2]
    assert (peer.seconds, peer.tokens_per_s, peer.state_bytes) == (0.024, 1000.0, 48)
    assert peer.quant == "gguf" and peer.activation_bytes == 256 << 20
    if isolate:  # each row's peak is its own process's: the peer's 256 MB in its rows only
        assert rows[2].peak_rss_bytes > rows[0].peak_rss_bytes + (200 << 20)


@pytest.mark.skipif(not llama_cpp.available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_times_a_prefill_of_its_gguf():
    from linearize.models.checkpoint import smollm2_gguf_path

    peer = llama_cpp.LlamaCppPeer(smollm2_gguf_path(), "llama.cpp", threads=1)
    work, args = peer.prefill(96)
    result = work(*args)
    assert result["seconds"] > 0 and result["activation_bytes"] >= 0
    assert result["state_bytes"] == 96 * peer.kv_per_token
    assert (result["quant"], result["engine"]) == ("gguf", "llama.cpp")


@pytest.mark.skipif(not llama_cpp.available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_end_without_a_traceback_at_exit():
    # Left to the garbage collector at interpreter exit, llama-cpp-python's finalizer runs after
    # its library is unloaded and prints a TypeError traceback into the user's bench output.
    script = """
from linearize.bench import llama_cpp
from linearize.models.checkpoint import smollm2_gguf_path
path = str(smollm2_gguf_path())
run = llama_cpp.LlamaDecoding(path, 64, 3, 1)
for i in range(3):
    run.step(timed=i > 0)
assert len(run.result()["times"]) == 2
assert llama_cpp.time_prefill(path, 32, 1, 1)["seconds"] > 0
print("done")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_bench_decode_refuses_runs_that_do_not_fit_together(saved, monkeypatch):
    from linearize.bench import speed

    path = saved
    spec = speed.ModelSpec(str(path))
    # Each run alone fits; two at once do not.
    one = sum(speed.memory_estimate(spec.load(), 40, PREFILL_SEGMENT).values())
    monkeypatch.setattr(speed, "available_memory_bytes", lambda: int(1.5 * one / 0.85))
    with pytest.raises(ValueError, match="2 decode runs taking turns at context 40 need about"):
        speed.bench_decode([spec, spec], (40,), steps=2, warmup=0)


def test_bench_decode_repeat_measures_fresh_runs_in_rounds(saved, tmp_path):
    from linearize.bench import speed

    path = saved
    log = tmp_path / "steps.log"
    spec = speed.ModelSpec(str(path))
    rows = speed.bench_decode(
        [spec], (40,), steps=3, warmup=1, isolate=False, repeat=2, peers=[_Peer(log)]
    )
    # Two rounds, each a fresh run of each (the peer's made twice: two warm-up steps).
    steps = _log(log)
    assert [timed for *_, timed, _ in steps] == [False, True, True, True] * 2
    for row in rows:
        assert len(row.round_ms) == 2 and row.tokens_per_s > 0
    assert rows[1].round_ms == [1.0, 1.0] and rows[1].ms_per_token == pytest.approx(1.0)
    assert rows[0].to_dict()["round_ms"] == rows[0].round_ms
    with pytest.raises(ValueError, match="repeat >= 1"):
        speed.bench_decode([spec], (40,), steps=3, repeat=0)


def test_bench_decode_cli_repeat(saved, tmp_path, capsys):
    model = saved
    argv = ["bench", "decode", "--model", str(model), "--contexts", "24", "--steps", "2"]
    argv += ["--repeat", "3", "--no-isolate", "--json", "--llama-cpp", "off"]
    assert main([*argv, "--out", str(tmp_path / "results")]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(row["round_ms"]) == 3 and row["tokens_per_s"] > 0
    record = json.loads((tmp_path / "results" / "decode.json").read_text())
    assert "--repeat 3" in record["command"]
    table = (tmp_path / "results" / "decode.md").read_text()
    assert "ms/token by round" in table
    assert main([*argv[:-6], "--repeat", "0", "--llama-cpp", "off"]) == 2


def test_bench_decode_failed_run_ends_the_others_processes(saved, tmp_path):
    import multiprocessing

    from linearize.bench import speed

    path = saved
    peer = _Peer(tmp_path / "steps.log")
    peer.label = "broken"  # its run raises while our run's process waits for its turn
    with pytest.raises(RuntimeError, match="this run cannot start"):
        speed.bench_decode([speed.ModelSpec(str(path))], (40,), steps=2, peers=[peer])
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_decode_run_prefills_on_every_core_and_steps_on_its_threads(engine, monkeypatch):
    """The prompt (not timed) is prefilled with the threads torch has when the run starts; the
    steps run on the run's ``threads`` (torch's and the engine's)."""
    import torch

    from linearize.bench.speed import ModelDecoding
    from linearize.models.quantize import quantize

    model = quantize(engine_model("augmented"), "int4")
    seen = []
    prefill = model.prefill
    monkeypatch.setattr(
        model, "prefill", lambda ids: seen.append(torch.get_num_threads()) or prefill(ids)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = ModelDecoding(model, 40, 8, engine, threads=1)
        assert seen == [2] and torch.get_num_threads() == 1
        if engine == "onnx":
            assert run.fast.options.intra_op_num_threads == 1
        run.step(timed=True)
        assert len(run.result()["times"]) == 1
    finally:
        torch.set_num_threads(before)
