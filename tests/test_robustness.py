"""Reliability sweep (issue 13): bad input never destroys a user's files, never answers garbage
with exit 0, never ends in a traceback.

``PROBES`` is the CLI table: (id, how to build the command, expected exit code, a fragment of the
one-line error, paths that must survive). Each probe runs ``linearize.cli.main`` in-process; an
exception escaping it is a traceback. The API table and a fuzz of config.json field types follow.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

import linearize
from linearize import Decoder, ModelConfig
from linearize.cli import main
from linearize.config import matches
from linearize.generation import GenerationConfig, generate
from linearize.models.directory import is_saved_model
from linearize.models.numerics import NonFiniteError
from linearize.paths import OutputError, atomic_dir, build_once
from tests.eval.conftest import TEXT, tiny_config, tiny_tokenizer

# --- a small world of files to probe -----------------------------------------------------------


def _edit_config(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the saved model ``src`` (weights linked) whose config.json is ``edit(meta)``."""
    dst.mkdir()
    meta = json.loads((src / "config.json").read_text())
    result = edit(meta)
    (dst / "config.json").write_text(json.dumps(meta if result is None else result))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def _edit_weights(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of ``src`` whose tensor ``name`` is filled with ``value``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    weights = safetensors.torch.load_file(src / "model.safetensors")
    weights[name] = torch.full_like(weights[name], value)
    safetensors.torch.save_file(weights, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(root: Path) -> dict[str, Path]:
    """Tiny saved models (softmax with a tokenizer and 64 positions, one without a tokenizer,
    augmented), a text, training runs with and without a model, empty and garbage GGUF files."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = Decoder(tiny_config(max_position_embeddings=64))
    model.tokenizer = tokenizer
    model.save(root / "model")
    bare = Decoder(tiny_config())
    bare.save(root / "bare")
    augmented = Decoder(tiny_config())
    linearize.linearize(
        augmented, {"name": "augmented", "size": 8, "conv": "causal", "conv_size": 4}
    )
    augmented.tokenizer = tokenizer
    augmented.save(root / "augmented")
    (root / "text.txt").write_text(TEXT * 4)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "config.json").write_text("{}")
    model.save(run / "model")
    unfinished = root / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text("{}\n")
    (root / "empty.gguf").write_bytes(b"")
    (root / "garbage.gguf").write_bytes(b"this is not a model" * 10)
    return {p.name: p for p in root.iterdir()} | {"root": root}


def _notes(tmp: Path) -> Path:
    """A user's folder that is not ours: it must survive every probe that does not overwrite."""
    notes = tmp / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    return notes


def _file(tmp: Path) -> Path:
    path = tmp / "plain.txt"
    path.write_text("a file")
    return path


def _hf_dir_with_shard(tmp: Path, shard: str) -> Path:
    from transformers import LlamaConfig

    folder = tmp / "hf"
    LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(folder)
    (tmp / "outside.safetensors").write_bytes(b"")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _convert(model: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--model", str(model), "--attention", "elu", "--out", str(out), *extra]


def _generate(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "It is a truth", *extra]


def _train(w: dict, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(w["model"]),
        "--attention",
        "augmented",
        "--group-size",
        "8",
        "--conv-size",
        "4",
        "--data",
        str(w["text.txt"]),
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--tokens",
        "256",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def _fuzzed(w: dict, t: Path, edit) -> Path:
    return _edit_config(w["bare"], t / "m", edit)


def _set(field: str, value):
    return lambda meta: meta["model"].__setitem__(field, value)


Probe = tuple[str, Callable[[dict, Path], list[str]], int, str, Callable[[Path], list[Path]]]

NOTHING: Callable[[Path], list[Path]] = lambda t: []

# (id, argv from (world, tmp), exit code, fragment of stderr, paths that must still exist)
PROBES: list[Probe] = [
    # 1. data loss: --out never destroys what is not ours
    (
        "convert-out-foreign-dir",
        lambda w, t: _convert(w["bare"], _notes(t)),
        2,
        "not empty and does not hold a model",
        lambda t: [t / "notes" / "notes.txt"],
    ),
    (
        "convert-out-file",
        lambda w, t: _convert(w["bare"], _file(t)),
        2,
        "is a file",
        lambda t: [t / "plain.txt"],
    ),
    (
        "convert-out-training-run",
        lambda w, t: _convert(w["bare"], w["run"]),
        2,
        "not empty",
        lambda t: [],
    ),
    (
        "convert-out-under-a-file",
        lambda w, t: _convert(w["bare"], _file(t) / "sub"),
        2,
        "cannot create",
        lambda t: [t / "plain.txt"],
    ),
    (
        "convert-out-foreign-overwrite",
        lambda w, t: _convert(w["bare"], _notes(t), "--overwrite"),
        0,
        "",
        NOTHING,
    ),
    ("convert-out-ours-replaced", lambda w, t: _convert(w["bare"], _saved(w, t)), 0, "", NOTHING),
    (
        "train-medusa-out-foreign-dir",
        lambda w, t: ["train-medusa", "--model", str(w["model"]), "--out", str(_notes(t))],
        2,
        "not empty",
        lambda t: [t / "notes" / "notes.txt"],
    ),
    (
        "train-out-foreign-dir",
        lambda w, t: _train(w, _notes(t)),
        2,
        "not empty",
        lambda t: [t / "notes" / "notes.txt"],
    ),
    (
        "demo-out-foreign-dir",
        lambda w, t: ["demo", "--smoke", "--out", str(_notes(t))],
        2,
        "holds files but no demo",
        lambda t: [t / "notes" / "notes.txt"],
    ),
    # 2. confident garbage: NaN / huge weights
    (
        "generate-nan-weights",
        lambda w, t: _generate(
            _edit_weights(w["model"], t / "nan", "layers.1.mlp.up_proj.weight", float("nan"))
        ),
        2,
        "layers.1.mlp.up_proj.weight",
        NOTHING,
    ),
    (
        "eval-nan-alpha",
        lambda w, t: [
            "eval",
            "ppl",
            "--model",
            str(_edit_weights(w["augmented"], t / "nan", "layers.0.self_attn.alpha", float("nan"))),
            "--data",
            str(w["text.txt"]),
            "--window",
            "32",
        ],
        2,
        "layers.0.self_attn.alpha",
        NOTHING,
    ),
    (
        "generate-huge-weights",
        lambda w, t: _generate(
            _edit_weights(w["augmented"], t / "huge", "layers.0.self_attn.conv", 1e30)
        ),
        2,
        "non-finite values",
        NOTHING,
    ),
    (
        "eval-huge-weights",
        lambda w, t: [
            "eval",
            "ppl",
            "--model",
            str(_edit_weights(w["model"], t / "huge", "layers.0.mlp.down_proj.weight", 1e30)),
            "--data",
            str(w["text.txt"]),
            "--window",
            "32",
        ],
        2,
        "non-finite values",
        NOTHING,
    ),
    # 3-4. config.json types and values, the field named
    (
        "config-hidden-size-string",
        lambda w, t: ["info", str(_fuzzed(w, t, _set("hidden_size", "576")))],
        2,
        "hidden_size must be int",
        NOTHING,
    ),
    (
        "config-top-level-list",
        lambda w, t: ["info", str(_fuzzed(w, t, lambda m: [m]))],
        2,
        "JSON object",
        NOTHING,
    ),
    (
        "config-model-null",
        lambda w, t: ["info", str(_fuzzed(w, t, lambda m: m.__setitem__("model", None)))],
        2,
        "'model' must be an object",
        NOTHING,
    ),
    (
        "config-attention-string",
        lambda w, t: ["info", str(_fuzzed(w, t, _set("attention", "augmented")))],
        2,
        "attention must be list",
        NOTHING,
    ),
    (
        "config-eos-string",
        lambda w, t: ["info", str(_fuzzed(w, t, _set("eos_token_id", "two")))],
        2,
        "eos_token_id must be",
        NOTHING,
    ),
    (
        "config-max-positions-string",
        lambda w, t: ["info", str(_fuzzed(w, t, _set("max_position_embeddings", "lots")))],
        2,
        "max_position_embeddings must be int",
        NOTHING,
    ),
    (
        "config-sizes-vs-weights",
        lambda w, t: ["info", str(_fuzzed(w, t, _set("intermediate_size", 4096)))],
        2,
        "has shape",
        NOTHING,
    ),
    (
        "config-huge-vocab",
        lambda w, t: ["info", str(_fuzzed(w, t, _set("vocab_size", 10**12)))],
        2,
        "has shape",
        NOTHING,
    ),
    (
        "option-size-not-int",
        lambda w, t: (
            _convert(w["bare"], t / "o", "--option", "size=abc") + ["--attention", "augmented"]
        ),
        2,
        "size must be int",
        NOTHING,
    ),
    # 5. misleading messages
    ("model-is-training-run", lambda w, t: ["info", str(w["run"])], 0, "", NOTHING),
    (
        "model-is-unfinished-run",
        lambda w, t: ["info", str(w["unfinished"])],
        2,
        "without a saved model yet",
        NOTHING,
    ),
    ("generate-without-tokenizer", lambda w, t: _generate(w["bare"]), 2, "no tokenizer", NOTHING),
    ("empty-gguf", lambda w, t: ["info", str(w["empty.gguf"])], 2, "empty.gguf is empty", NOTHING),
    (
        "garbage-gguf",
        lambda w, t: ["info", str(w["garbage.gguf"])],
        2,
        "garbage.gguf is not a GGUF",
        NOTHING,
    ),
    (
        "bench-steps-zero",
        lambda w, t: [
            "bench",
            "decode",
            "--model",
            str(w["bare"]),
            "--steps",
            "0",
            "--contexts",
            "16",
            "--no-isolate",
            "--out",
            str(t / "r"),
        ],
        2,
        "steps >= 1",
        NOTHING,
    ),
    (
        "bench-warmup-negative",
        lambda w, t: [
            "bench",
            "decode",
            "--model",
            str(w["bare"]),
            "--warmup",
            "-1",
            "--contexts",
            "16",
            "--no-isolate",
            "--out",
            str(t / "r"),
        ],
        2,
        "warmup >= 0",
        NOTHING,
    ),
    (
        "train-eval-tokens-zero",
        lambda w, t: _train(w, t / "run", "--eval-tokens", "0"),
        0,
        "",
        NOTHING,
    ),
    # 6. unbounded inputs
    (
        "generate-past-trained-positions",
        lambda w, t: _generate(w["model"], "--prompt", "truth " * 70),
        2,
        "max_position_embeddings=64",
        NOTHING,
    ),
    (
        "generate-past-trained-positions-allowed",
        lambda w, t: _generate(w["model"], "--prompt", "truth " * 70, "--allow-long-context"),
        0,
        "",
        NOTHING,
    ),
    (
        "shard-parent-path",
        lambda w, t: ["info", str(_hf_dir_with_shard(t, "../outside.safetensors"))],
        2,
        "outside the model folder",
        NOTHING,
    ),
    (
        "shard-absolute-path",
        lambda w, t: ["info", str(_hf_dir_with_shard(t, str(t / "outside.safetensors")))],
        2,
        "outside the model folder",
        NOTHING,
    ),
]


def _saved(w: dict, t: Path) -> Path:
    """One of our saved models, as a convert target that may be replaced."""
    path = t / "ours"
    Decoder(tiny_config()).save(path)
    return path


@pytest.mark.parametrize("probe", PROBES, ids=[p[0] for p in PROBES])
def test_cli_probe(probe: Probe, world, tmp_path, capsys, user_cache):
    name, argv, expected, fragment, survivors = probe
    args = argv(world, tmp_path)
    try:
        code = main(args)
    except Exception as e:  # a traceback: exactly what this sweep forbids
        pytest.fail(f"{name}: {type(e).__name__} escaped the CLI: {e}")
    err = capsys.readouterr().err
    assert code == expected, f"{name}: exit {code}, expected {expected}; stderr: {err[-400:]}"
    if expected == 2:
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and fragment in lines[0], f"{name}: stderr {err[-400:]!r}"
    for path in survivors(tmp_path):
        assert path.exists(), f"{name}: {path} was destroyed"


def test_debug_flag_shows_the_traceback(world):
    with pytest.raises(ValueError, match="empty"):
        main(["--debug", "info", str(world["empty.gguf"])])


def writing(directory: Path):
    """The writer every model save goes through (our models may be replaced)."""
    return atomic_dir(directory, replaceable=is_saved_model)


# --- the output directory writer ---------------------------------------------------------------


def test_second_writer_fails_clearly(tmp_path):
    with writing(tmp_path / "m"), pytest.raises(OutputError, match="another process"):
        Decoder(tiny_config()).save(tmp_path / "m")


def test_a_cache_folder_is_built_once_and_waited_for(tmp_path):
    """Two processes wanting the same engine graph: the second waits for the first's build
    and uses it (before, it failed with "another process is writing")."""
    entry, built = tmp_path / "graph", []
    inside, release = threading.Event(), threading.Event()

    def slow(tmp: Path) -> None:
        built.append("first")
        (tmp / "half").write_text("1")
        inside.set()
        release.wait(10)
        (tmp / "whole").write_text("2")

    results = {}
    first = threading.Thread(target=lambda: results.update(first=build_once(entry, slow)))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(
        target=lambda: results.update(second=build_once(entry, lambda t: built.append("second")))
    )
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and not entry.exists()  # waiting, and nothing half-built shows
    release.set()
    first.join(10)
    second.join(10)
    assert results == {"first": True, "second": False} and built == ["first"]
    assert sorted(p.name for p in entry.iterdir()) == ["half", "whole"]
    assert build_once(entry, lambda t: built.append("third")) is False and built == ["first"]


def test_a_failed_cache_build_leaves_nothing(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("1")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        build_once(tmp_path / "graph", broken)
    assert list(tmp_path.iterdir()) == []
    assert build_once(tmp_path / "graph", lambda t: (t / "ok").write_text("1")) is True
    assert [p.name for p in (tmp_path / "graph").iterdir()] == ["ok"]


def test_a_saved_model_is_readable_by_others(tmp_path):
    Decoder(tiny_config()).save(tmp_path / "m")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_interrupted_write_leaves_the_old_model_and_no_temp(tmp_path):
    model = Decoder(tiny_config())
    model.save(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt), writing(tmp_path / "m") as tmp:
        (tmp / "half").write_text("half written")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    stale = tmp_path / ".m.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    # Killed between the two renames: only the old model remains, under its hidden name.
    Decoder(tiny_config()).save(tmp_path / ".m.old")
    with writing(tmp_path / "m") as tmp:
        assert (tmp_path / "m" / "config.json").exists(), "the old model was not put back"
        (tmp / "config.json").write_text(json.dumps({"format": "linearize"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_sigterm_while_writing_removes_the_temp_directory(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "from linearize.paths import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'0' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, env=env
    )
    assert done.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_temp_directory_of_an_older_version_is_cleaned(tmp_path):
    old = tmp_path / ".m.k2j4_x9a"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"\0" * 1000)
    keep = tmp_path / ".m.notes123"
    keep.mkdir()
    (keep / "diary.txt").write_text("mine")
    Decoder(tiny_config()).save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.notes123", "m"]


# --- API inputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Decoder(tiny_config()).eval()


def _other_state(model):
    other = Decoder(tiny_config(num_kv_heads=4))
    return other(torch.tensor([[1, 2]]))[1]


API_CASES = [
    ("python-list", lambda m: m([[1, 2, 3]]), TypeError, "torch.Tensor"),
    ("float-ids", lambda m: m(torch.tensor([[1.0, 2.0]])), TypeError, "integer token ids"),
    ("empty-ids", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
    ("id-out-of-range", lambda m: m(torch.tensor([[500]])), ValueError, r"\[0, 128\)"),
    (
        "state-batch-size",
        lambda m: m(torch.tensor([[1]]), state=m(torch.tensor([[1], [2]]))[1]),
        ValueError,
        "batch size 2",
    ),
    (
        "state-other-model",
        lambda m: m(torch.tensor([[1]]), state=_other_state(m)),
        ValueError,
        "another model",
    ),
    ("state-not-a-state", lambda m: m(torch.tensor([[1]]), state=[1]), TypeError, "ModelState"),
    ("generate-float-ids", lambda m: generate(m, [1.5, 2]), TypeError, "integers"),
    (
        "generate-past-positions",
        lambda m: generate(m, [1] * 2048, GenerationConfig(max_new_tokens=16)),
        ValueError,
        "allow_long_context",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_input(case, tiny):
    _, call, error, fragment = case
    with pytest.raises(error, match=fragment):
        call(tiny)


def test_non_finite_activation_names_the_layer():
    model = Decoder(tiny_config()).eval()
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"layer 1 \(softmax\)"):
        model(torch.tensor([[1, 2, 3]]))


# --- a fuzz of config.json field types ------------------------------------------------------------

WRONG_VALUES = ["576", 1.5, True, None, [1], {"a": 1}, -1]


def _fuzz_cases():
    hints = typing.get_type_hints(ModelConfig)
    cases = []
    for field in dataclasses.fields(ModelConfig):
        for value in WRONG_VALUES:
            if not matches(value, hints[field.name]):
                cases.append(pytest.param(field.name, value, id=f"{field.name}={value!r}"))
    return cases


@pytest.mark.parametrize("field, value", _fuzz_cases())
def test_config_field_type_fuzz(field, value, world, tmp_path):
    path = _edit_config(world["bare"], tmp_path / "m", _set(field, value))
    with pytest.raises((TypeError, ValueError), match=re.escape(field)):
        linearize.load(path)


# --- the sweep as a user meets it: each probe in its own process ------------------------------


def sweep(root: Path) -> dict[str, int]:
    """Run every probe as ``python -m linearize ...`` and count what the issue forbids."""
    import os
    import subprocess
    import sys

    world_ = build_world(root / "world")
    counts = {"probes": 0, "data_lost": 0, "tracebacks": 0, "exit0_on_bad_input": 0, "other": 0}
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache")}
    for i, (name, argv, expected, fragment, survivors) in enumerate(PROBES):
        tmp = root / f"probe{i}"
        tmp.mkdir()
        args = [sys.executable, "-m", "linearize", *argv(world_, tmp)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        lost = [p for p in survivors(tmp) if not p.exists()]
        verdicts = []
        if lost:
            verdicts.append("data_lost")
        if "Traceback" in done.stderr:
            verdicts.append("tracebacks")
        if expected != 0 and done.returncode == 0:
            verdicts.append("exit0_on_bad_input")
        if not verdicts and (done.returncode != expected or fragment not in done.stderr):
            verdicts.append("other")
        counts["probes"] += 1
        for verdict in verdicts:
            counts[verdict] += 1
        last = (done.stderr.strip().splitlines() or [""])[-1]
        print(f"{name:<42} exit {done.returncode}  {' '.join(verdicts) or 'ok':<12} {last[:90]}")
    return counts


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        print(json.dumps(sweep(Path(directory))))
