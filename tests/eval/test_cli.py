"""The eval and bench commands on tiny saved models: valid rows, clear errors."""

from __future__ import annotations

import json
import math

import pytest

from linearize.bench import report
from linearize.cli import main

DECODE_KEYS = {
    *("model", "context", "tokens_per_s", "ms_per_token", "state_bytes", "peak_rss_bytes"),
    *("quant", "engine", "kv_type", "read_bytes"),
}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_eval_ppl_json(tiny_dirs, capsys):
    code = main(
        [
            "eval",
            "ppl",
            "--model",
            tiny_dirs["augmented"],
            "--data",
            tiny_dirs["text"],
            "--window",
            "32",
            "--json",
        ]
    )
    assert code == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert set(row) == {"ppl", "nll", "tokens", "window", "form", "seconds"}
    assert math.isclose(row["ppl"], math.exp(row["nll"]), rel_tol=1e-9)
    assert row["window"] == 32 and row["form"] == "chunk" and row["tokens"] > 0


def test_eval_ppl_forms_agree_and_save_a_record(tiny_dirs, capsys, tmp_path):
    values = []
    for form in ("parallel", "recurrent"):
        main(
            [
                "eval",
                "ppl",
                "--model",
                tiny_dirs["augmented"],
                "--data",
                tiny_dirs["text"],
                "--window",
                "24",
                "--tokens",
                "72",
                "--form",
                form,
                "--json",
                "--out",
                str(tmp_path),
            ]
        )
        values.append(_json_lines(capsys.readouterr().out)[0]["nll"])
    assert math.isclose(values[0], values[1], rel_tol=1e-4)
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("ppl-*.json"))]
    assert [r["rows"][0]["form"] for r in records] == ["parallel", "recurrent"]
    assert all(r["kind"] == "ppl" and r["rows"][0]["data"] == tiny_dirs["text"] for r in records)


def test_eval_ppl_of_a_model_linearized_on_the_fly(tiny_dirs, capsys, tmp_path):
    base = [
        "eval",
        "ppl",
        "--model",
        tiny_dirs["softmax"],
        "--data",
        tiny_dirs["text"],
        "--window",
        "32",
        "--json",
        "--out",
        str(tmp_path),
    ]
    main(base)
    main([*base, "--attention", "elu"])
    main([*base, "--attention", "augmented", "--group-size", "4", "--option", "sinks=0"])
    original, linear, local = (
        _json_lines(line)[0] for line in capsys.readouterr().out.splitlines()
    )
    assert original["ppl"] != linear["ppl"] and local["ppl"] != original["ppl"]
    models = sorted(json.loads(p.read_text())["rows"][0]["model"] for p in tmp_path.glob("*.json"))
    name = tiny_dirs["softmax"]
    assert models == [name, name + "+augmented(sinks=0,size=4)", name + "+elu"]
    commands = [json.loads(p.read_text())["command"] for p in tmp_path.glob("*.json")]
    assert any("--option sinks=0 --group-size 4" in c for c in commands)
    # Each record says what its model is, under the row's label (linearized on the fly: linear).
    families = {}
    for path in tmp_path.glob("*.json"):
        families.update(json.loads(path.read_text())["extra"]["models"])
    assert {m: families[m]["family"] for m in models} == {
        name: "softmax",
        name + "+augmented(sinks=0,size=4)": "linear",
        name + "+elu": "linear",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "no-such-corpus"], "austen:eval"),
        (["--window", "100000"], "larger than the text"),
        (["--window", "1"], "window must be"),
    ],
)
def test_eval_ppl_bad_inputs(tiny_dirs, capsys, argv, message):
    base = ["eval", "ppl", "--model", tiny_dirs["softmax"], "--data", tiny_dirs["text"]]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_a_path_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["eval", "ppl", "--model", str(tmp_path / "notes.txt")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["bench", "decode", "--model", str(tmp_path), "--no-isolate"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bench_decode_rows(tiny_dirs, capsys, tmp_path):
    argv = [
        "bench",
        "decode",
        "--model",
        tiny_dirs["softmax"],
        "--model",
        tiny_dirs["augmented"],
        "--contexts",
        "16,48,96",
        "--steps",
        "4",
        "--json",
        "--no-isolate",
        "--llama-cpp",
        "off",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 6 and all(set(r) == DECODE_KEYS for r in rows)
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["context"]] = r
    softmax, linear = by_model[tiny_dirs["softmax"]], by_model[tiny_dirs["augmented"]]
    # The softmax model was trained to 64 positions: 96 is reported as not supported.
    assert softmax[96]["tokens_per_s"] is None and softmax[96]["state_bytes"] is None
    assert softmax[48]["state_bytes"] == 3 * softmax[16]["state_bytes"]
    assert len({r["state_bytes"] for r in linear.values()}) == 1
    assert softmax[96]["read_bytes"] is None
    for r in [softmax[16], softmax[48], *linear.values()]:
        assert (
            r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 and r["read_bytes"] > r["state_bytes"]
        )
        assert math.isclose(r["tokens_per_s"] * r["ms_per_token"], 1000, rel_tol=1e-9)
    record = json.loads((tmp_path / "decode.json").read_text())
    assert record["rows"] == rows and record["extra"]["bandwidth_bytes_per_s"] > 0
    assert (tmp_path / "decode.md").exists() and (tmp_path / "decode.png").exists()


def test_bench_decode_measures_in_a_fresh_process(tiny_dirs, capsys, tmp_path):
    argv = [
        "bench",
        "decode",
        "--model",
        tiny_dirs["augmented"],
        "--contexts",
        "32",
        "--steps",
        "3",
        "--json",
        "--llama-cpp",
        "off",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert row["model"] == tiny_dirs["augmented"] and row["tokens_per_s"] > 0
    # Its own peak RSS, which includes torch itself (well over 50 MB).
    assert row["peak_rss_bytes"] > 50e6


def test_bench_decode_warmup_is_recorded_and_checked(tiny_dirs, capsys, tmp_path):
    argv = ["bench", "decode", "--model", tiny_dirs["augmented"], "--steps", "3"]
    argv += ["--no-isolate", "--llama-cpp", "off", "--json", "--out", str(tmp_path)]
    assert main([*argv, "--contexts", "32", "--warmup", "6"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert row["tokens_per_s"] > 0
    assert "--warmup 6" in json.loads((tmp_path / "decode.json").read_text())["command"]
    # The prompt is context - warmup - steps tokens: a context that leaves none is refused.
    assert main([*argv, "--contexts", "9", "--warmup", "6"]) == 2
    assert "context 9 must be an integer >= 10" in capsys.readouterr().err


def test_bench_decode_refuses_a_context_memory_cannot_hold(tiny_dirs, capsys, tmp_path):
    argv = [
        "bench",
        "decode",
        "--model",
        tiny_dirs["augmented"],
        "--contexts",
        "1000000000000",
        "--out",
        str(tmp_path),
        "--llama-cpp",
        "off",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "available" in err
    assert not (tmp_path / "decode.json").exists()


def test_bench_prefill_rows(tiny_dirs, capsys, tmp_path):
    argv = [
        "bench",
        "prefill",
        "--model",
        tiny_dirs["softmax"],
        "--attention",
        "augmented",
        "--contexts",
        "32,128",
        "--json",
        "--no-isolate",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 4
    for r in rows:
        assert set(r) == {
            "model",
            "context",
            "seconds",
            "tokens_per_s",
            "state_bytes",
            "peak_rss_bytes",
            "activation_bytes",
            "quant",
            "engine",
        }
        assert r["seconds"] > 0 and r["activation_bytes"] >= 0
        assert (r["quant"], r["engine"]) == ("none", "torch")  # fp32: the reference
    record = json.loads((tmp_path / "prefill.json").read_text())
    assert any("past its max_position_embeddings" in n for n in record["extra"]["notes"])


def test_bench_speculative_rows(tiny_dirs, capsys, tmp_path):
    argv = [
        "bench",
        "speculative",
        "--model",
        tiny_dirs["augmented"],
        "--max-new-tokens",
        "4",
        "--draft-layers",
        "1",
        "--json",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["plain", "lookup", "draft"]
    for r in rows:
        assert r["model"] == tiny_dirs["augmented"] and r["tokens_per_s"] > 0
        assert r["identical"] is True
    record = json.loads((tmp_path / "speculative.json").read_text())
    assert record["kind"] == "speculative" and "--draft-layers 1" in record["command"]
    assert (tmp_path / "speculative.md").exists() and (tmp_path / "speculative.png").exists()


def test_bench_report_builds_the_page(tiny_dirs, capsys, tmp_path):
    results = tmp_path / "results"
    main(
        [
            "bench",
            "decode",
            "--model",
            tiny_dirs["softmax"],
            "--attention",
            "augmented",
            "--contexts",
            "16,32",
            "--steps",
            "3",
            "--no-isolate",
            "--llama-cpp",
            "off",
            "--out",
            str(results),
        ]
    )
    main(
        [
            "bench",
            "prefill",
            "--model",
            tiny_dirs["softmax"],
            "--attention",
            "augmented",
            "--contexts",
            "16,32",
            "--no-isolate",
            "--out",
            str(results),
        ]
    )
    page = tmp_path / "docs" / "results.md"
    assert main(["bench", "report", "--results", str(results), "--page", str(page)]) == 0
    text = page.read_text()
    for heading in ("## Machine", "## Goals", "## Decode", "## Prefill", "## Commands"):
        assert heading in text
    assert "linearize bench decode --model" in text
    # The recorded command reproduces the run, llama.cpp's choice included.
    assert "--no-isolate --llama-cpp off" in text
    assert (tmp_path / "docs" / "results" / "decode.png").exists()
    assert "](results/decode.png)" in text
    assert main(["bench", "report", "--results", str(tmp_path / "empty"), "--page", str(page)]) == 2
    # Notes written by hand after the marker survive a rebuild (once, before the commands);
    # text before the marker does not.
    notes = f"{report.NOTES_MARKER}\n\n## A hand-written run\n\nmeasured by hand\n\n"
    page.write_text(text.replace("## Commands", "stray edit\n\n" + notes + "## Commands"))
    for _ in range(2):
        assert main(["bench", "report", "--results", str(results), "--page", str(page)]) == 0
        rebuilt = page.read_text()
        assert rebuilt.count("measured by hand") == 1 and "stray edit" not in rebuilt
        assert rebuilt.index("## A hand-written run") < rebuilt.index("## Commands")


def test_eval_ppl_on_the_onnx_engine(tiny_dirs, capsys):
    pytest.importorskip("onnxruntime")
    rows = {}
    for engine in ("torch", "onnx"):
        argv = ["eval", "ppl", "--model", tiny_dirs["augmented"], "--data", tiny_dirs["text"]]
        argv += ["--window", "32", "--tokens", "72", "--quant", "int4", "--engine", engine]
        assert main([*argv, "--buckets", "0,8,16", "--json"]) == 0
        (rows[engine],) = _json_lines(capsys.readouterr().out)
    assert rows["onnx"]["form"] == "engine" and rows["torch"]["form"] == "chunk"
    assert rows["onnx"]["tokens"] == rows["torch"]["tokens"]
    # Same int4 weights; the engine's int8 arithmetic moves the score a little, not more.
    assert math.isclose(rows["onnx"]["nll"], rows["torch"]["nll"], rel_tol=0.05)
    # By position inside the windows, through the engine as through the reference.
    ours, reference = rows["onnx"]["buckets"], rows["torch"]["buckets"]
    assert [(b["from"], b["tokens"]) for b in ours] == [(b["from"], b["tokens"]) for b in reference]
    for a, b in zip(ours, reference, strict=True):
        assert math.isclose(a["ppl"], b["ppl"], rel_tol=0.05)
    # Perplexity by position through the engine: its buckets, its arithmetic.
    argv = ["eval", "ppl", "--model", tiny_dirs["augmented"], "--data", tiny_dirs["text"]]
    argv += ["--tokens", "150", "--quant", "int4", "--stream", "--buckets", "0,16,80", "--json"]
    streams = {}
    for engine in ("torch", "onnx"):
        assert main([*argv, "--engine", engine]) == 0
        (streams[engine],) = _json_lines(capsys.readouterr().out)
    assert streams["onnx"]["form"] == "engine" and streams["onnx"]["scored_as"] == "stream"
    ours, reference = streams["onnx"]["buckets"], streams["torch"]["buckets"]
    assert [(b["from"], b["tokens"]) for b in ours] == [(0, 15), (16, 64), (80, 70)]
    assert [(b["from"], b["tokens"]) for b in reference] == [(0, 15), (16, 64), (80, 70)]
    for a, b in zip(ours, reference, strict=True):
        assert math.isclose(a["ppl"], b["ppl"], rel_tol=0.05)


LLAMA_CPP_RUNS = {"decode": ["--steps", "2"], "prefill": []}


@pytest.mark.parametrize("kind", LLAMA_CPP_RUNS)
def test_bench_llama_cpp_on_says_how_to_install_it(tiny_dirs, capsys, monkeypatch, kind):
    from linearize.bench import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    argv = ["bench", kind, "--model", tiny_dirs["augmented"], "--contexts", "32"]
    assert main([*argv, *LLAMA_CPP_RUNS[kind], "--llama-cpp", "on"]) == 2
    assert "pip install 'linearize[llama-cpp]'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", LLAMA_CPP_RUNS)
def test_bench_llama_cpp_on_needs_a_gguf(tiny_dirs, capsys, tmp_path, monkeypatch, kind):
    from linearize.bench import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    argv = ["bench", kind, "--model", tiny_dirs["augmented"], "--contexts", "32"]
    argv += [*LLAMA_CPP_RUNS[kind], "--llama-cpp", "on", "--out", str(tmp_path)]
    # Refused before measuring: a saved directory has no GGUF for llama.cpp to run.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no GGUF" in err and "add --model smollm2-135m" in err
    assert not (tmp_path / f"{kind}.json").exists()


def test_eval_ppl_buckets_by_position_in_windows_and_a_short_text_names_them(
    tiny_dirs, capsys, tmp_path
):
    base = ["eval", "ppl", "--model", tiny_dirs["augmented"], "--data", tiny_dirs["text"]]
    # Without --stream: positions inside each window, pooled over the windows.
    assert main([*base, "--window", "32", "--buckets", "0,8,16", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["bucket_positions"] == "in window"
    assert [(b["from"], b["to"]) for b in row["buckets"]] == [(0, 8), (8, 16), (16, 32)]
    assert sum(b["tokens"] for b in row["buckets"]) == row["tokens"]
    assert main([*base, "--window", "32", "--buckets", "0,8,16"]) == 0
    assert "by position inside the window" in capsys.readouterr().out
    # An edge no window reaches is refused before anything runs.
    assert main([*base, "--window", "32", "--buckets", "0,16,32"]) == 2
    assert "not inside a window of 32 tokens" in capsys.readouterr().err
    # The default buckets start with 0–1024: a shorter text says which buckets it was given.
    assert main([*base, "--stream", "--window", "16"]) == 2
    assert "of --buckets 0,1024,4096" in capsys.readouterr().err
