"""``export-hf``: the directory's contents, remote code without ``import linearize``, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.generation import MedusaConfig, MedusaHeads
from linearize.generation.medusa import save_with_heads
from linearize.hf import LinearizeConfig, export_hf
from tests.generation.conftest import text_model

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 23, 7]])
ALLOWED = {".json", ".safetensors", ".py", ".jinja"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple:
    model = text_model("hybrid")
    directory = tmp_path_factory.mktemp("export") / "hf"
    export_hf(model, directory)
    return model, directory


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter that never imports linearize itself (it finds it on PYTHONPATH)."""
    src = str(Path(linearize.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_directory_holds_no_pickles_and_has_the_tokenizer(exported):
    _, directory = exported
    names = {p.name for p in directory.iterdir()}
    assert {p.suffix for p in directory.iterdir()} <= ALLOWED
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "linearize"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linearize.LinearizeForCausalLM"
    assert config["attention_types"] == ["softmax", "augmented"]


def test_trust_remote_code_loads_it_without_importing_linearize(exported, tmp_path):
    """One fresh interpreter: a copy without our Python files fails naming the missing file;
    the export itself loads (its Python files import linearize) and gives our logits."""
    model, directory = exported
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in directory.iterdir():
        if path.suffix != ".py":
            (bare / path.name).write_bytes(path.read_bytes())
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "torch.set_num_threads(1)\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(bare)!r}, trust_remote_code=True)\n"
        "except OSError as e:\n"
        "    print('missing:', 'configuration_linearize.py' in str(e))\n"
        "assert 'linearize' not in sys.modules\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(directory)!r}, trust_remote_code=True)\n"
        f"print(type(m).__name__, m(torch.tensor({PROMPT.tolist()})).logits.sum().item())\n"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    missing, name = result.stdout.strip().split("\n")
    assert missing == "missing: True"
    assert name.split()[0] == "LinearizeForCausalLM"
    assert float(name.split()[1]) == pytest.approx(model(PROMPT)[0].sum().item(), rel=1e-6)
    # With linearize imported the classes are registered: no Python files needed.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(bare).config.model_type == "linearize"


def test_linearize_load_reads_an_export(exported):
    model, directory = exported
    again = linearize.load(directory)
    assert again.attention_names() == model.attention_names()
    assert torch.equal(again(PROMPT)[0], model(PROMPT)[0])
    assert again.tokenizer is not None


def test_medusa_heads_are_refused_unless_dropped(tmp_path, capsys):
    model = text_model("augmented")
    config = model.config
    heads = MedusaHeads(MedusaConfig(2, config.hidden_size, config.vocab_size))
    save_with_heads(model, heads, tmp_path / "saved")
    args = ["export-hf", "--model", str(tmp_path / "saved"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "2 Medusa heads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--drop-medusa"]) == 0
    assert "left out 2 Medusa heads" in capsys.readouterr().out
    assert not any("medusa" in p.name for p in (tmp_path / "out").iterdir())


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        LinearizeConfig(model={"num_layers": 1, "attention": [{"name": "nope"}]})
    with pytest.raises(ValueError, match="format 'linearize' version 99"):
        LinearizeConfig(format_version=99)


def test_cli_export_hf(tmp_path, capsys):
    model = text_model("softmax")
    model.save(tmp_path / "saved")
    code = main(
        [
            "export-hf",
            "--model",
            str(tmp_path / "saved"),
            "--attention",
            "augmented",
            "--option",
            "size=4",
            "--layers",
            "1",
            "--out",
            str(tmp_path / "hf"),
        ]
    )
    assert code == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    loaded = linearize.load(tmp_path / "hf")
    assert loaded.attention_names() == ["softmax", "augmented"]
    assert main(["export-hf", "--model", str(tmp_path / "nowhere"), "--out", "x"]) == 2
