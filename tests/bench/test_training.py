"""``linearize bench train`` on a tiny saved model and a small text file."""

from __future__ import annotations

import json

import pytest

from linearize.bench.training import TrainBenchConfig
from linearize.cli import main
from tests.eval.conftest import TEXT
from tests.generation.conftest import text_model


def test_bench_train_results(tmp_path, capsys):
    model, text = tmp_path / "tiny", tmp_path / "text.txt"
    text_model("softmax").save(model)
    text.write_text(TEXT * 4)
    code = main(
        [
            "bench", "train", "--model", str(model), "--data", str(text), "--eval-data", str(text),
            "--transfer-tokens", "32", "--finetune-tokens", "32", "--block-size", "16",
            "--eval-windows", "2", "--eval-window", "16", "--hf-steps", "1", "--skip", "hf",
            "--out", str(tmp_path / "results"),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    [path] = (tmp_path / "results").glob("*/results.json")
    results = json.loads(path.read_text())
    assert {"args", "threads", "softmax", "ours_full_finetune", "augmented", "elu"} <= set(results)
    assert "hf_full_finetune" not in results
    assert results["augmented"]["stage_tokens"] == {"transfer": 32, "finetune": 32}
    assert set(results["augmented"]["tokens_per_s"]) == {"transfer", "finetune"}
    assert results["elu"]["eval"]["scored"] == 2 * 15
    assert f"results: {path}" in out


def test_bench_train_refuses_unknown_skip():
    with pytest.raises(ValueError, match="skip"):
        TrainBenchConfig(skip=["nothing"]).validate()
