"""The study on a tiny model with a tiny budget: every row, resumability, outputs."""

from __future__ import annotations

import csv
import json

import pytest

from linearize.cli import main
from linearize.eval.study import StudyConfig, study_variants, variant_path
from linearize.layers.config import ABLATIONS, attention_config, list_attentions


def test_the_variants_cover_every_causal_attention_and_ablation():
    variants = study_variants()
    causal = [n for n in list_attentions() if attention_config(n).is_causal and n != "softmax"]
    assert "linformer" not in variants
    for name in causal:
        if name != "augmented":
            assert variants[name] == {"name": name}
    for ablation, options in ABLATIONS.items():
        assert variants[f"augmented:{ablation}"] == {"name": "augmented", **options}
    assert variants["softmax"] is None and variants["softmax+finetune"] is None


def test_bad_study_configs():
    with pytest.raises(ValueError, match="--eval-data"):
        StudyConfig(data="some/file.txt").validate()
    with pytest.raises(ValueError, match="unknown variant"):
        StudyConfig(variants=["nope"]).validate()


def test_study_runs_resumes_and_writes_its_table(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "study",
        "--model",
        tiny_dirs["softmax"],
        "--data",
        tiny_dirs["text"],
        "--eval-data",
        tiny_dirs["text"],
        "--tokens",
        "96",
        "--eval-tokens",
        "64",
        "--window",
        "32",
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--variants",
        "softmax,softmax+finetune,elu,augmented:local+conv",
        "--out",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["variant"] for r in rows] == [
        "softmax",
        "softmax+finetune",
        "elu",
        "augmented:local+conv",
    ]
    assert rows[0]["ratio"] == 1.0 and rows[0]["train_tokens"] == 0
    for r in rows[1:]:
        assert r["train_tokens"] == 96 and r["ppl"] > 1 and r["ratio"] > 0
    assert rows[3]["options"] == {"use_global": False, "conv": "causal"}
    with (out / "study.csv").open() as f:
        assert [r["variant"] for r in csv.DictReader(f)] == [r["variant"] for r in rows]
    assert (out / "study.md").exists() and (out / "study.png").exists()
    # A rerun skips finished variants: a marked result file comes back unchanged.
    path = variant_path(out, "elu")
    record = json.loads(path.read_text())
    record["row"]["ppl"] = 12345.0
    path.write_text(json.dumps(record))
    assert main(argv) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert again[2]["ppl"] == 12345.0
