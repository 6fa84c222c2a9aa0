"""``linearize generate`` and ``linearize train-medusa`` on a tiny saved model with a tokenizer."""

from __future__ import annotations

import io
import json

import pytest

from linearize.cli import main
from linearize.generation import load_heads
from tests.generation.conftest import text_model, tiny_model

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    text_model("augmented").save(path)
    return path


def _generate(capsys, model_dir, *extra):
    code = main(["generate", "--model", str(model_dir), "--prompt", "Hi", *extra])
    return code, capsys.readouterr()


def test_json_output(capsys, model_dir):
    code, out = _generate(capsys, model_dir, "--max-new-tokens", "6", "--json")
    assert code == 0
    result = json.loads(out.out)
    for key in ("token_ids", "text", "tokens_per_s", "forward_passes", "mean_accepted"):
        assert key in result
    assert len(result["token_ids"]) == 6 and result["forward_passes"] == 5


def test_streams_text(capsys, model_dir):
    code, out = _generate(capsys, model_dir, "--max-new-tokens", "8", "--temperature", "0.7")
    assert code == 0 and "tokens/s" in out.err
    flags = ("--max-new-tokens", "8", "--temperature", "0.7", "--seed", "1")
    _, streamed = _generate(capsys, model_dir, *flags)
    _, as_json = _generate(capsys, model_dir, *flags, "--json")
    assert streamed.out == json.loads(as_json.out)["text"] + "\n"


def test_lookup_and_draft_layers_match_plain(capsys, model_dir):
    _, plain = _generate(capsys, model_dir, "--max-new-tokens", "12", "--json")
    for extra in (("--speculative", "lookup"), ("--speculative", "draft", "--draft-layers", "1")):
        _, out = _generate(capsys, model_dir, "--max-new-tokens", "12", "--json", *extra)
        result = json.loads(out.out)
        assert result["token_ids"] == json.loads(plain.out)["token_ids"]
        assert result["speculation"]["mode"] == extra[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--max-new-tokens", "0"), "max_new_tokens must be >= 1"),
        (("--speculative", "medusa"), "no Medusa heads"),
        (("--speculative", "medusa", "--tree", "tree-3"), "unknown tree"),
    ],
)
def test_bad_inputs(capsys, model_dir, extra, message):
    code, out = _generate(capsys, model_dir, *extra)
    assert code == 2 and message in out.err and out.out == ""


def test_prompt_file_and_stdin_give_the_prompts_output(capsys, model_dir, tmp_path, monkeypatch):
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "5", "--json"]
    assert main([*args, "--prompt", TEXT]) == 0
    expected = json.loads(capsys.readouterr().out)["token_ids"]
    (tmp_path / "prompt.txt").write_text(TEXT, encoding="utf-8")
    assert main([*args, "--prompt-file", str(tmp_path / "prompt.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT))
    assert main([*args, "--prompt-file", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected


def test_bad_prompt_files(capsys, model_dir, tmp_path):
    args = ["generate", "--model", str(model_dir), "--prompt-file"]
    assert main([*args, str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert main([*args, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert main([*args, str(tmp_path / "latin1.txt")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main([*args, str(tmp_path / "empty.txt")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of --prompt / --prompt-file, not both
        main([*args, str(tmp_path / "empty.txt"), "--prompt", "Hi"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_empty_prompt_and_foreign_draft(capsys, model_dir, tmp_path):
    assert main(["generate", "--model", str(model_dir), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    tiny_model("softmax").save(tmp_path / "other")
    code = main(
        ["generate", "--model", str(model_dir), "--prompt", "Hi", "--speculative", "draft",
         "--draft", str(tmp_path / "other"), "--gamma", "2"]
    )  # fmt: skip
    assert code == 2 and "vocabulary" in capsys.readouterr().err


def test_train_medusa_then_generate(capsys, model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    out = tmp_path / "with-heads"
    code = main(
        ["train-medusa", "--model", str(model_dir), "--out", str(out), "--tokens", "1024",
         "--corpus", str(corpus), "--eval-tokens", "256", "--block-size", "64", "--num-heads", "2"]
    )  # fmt: skip
    assert code == 0
    assert "top1" in capsys.readouterr().out
    heads = load_heads(out)
    assert heads is not None and len(heads) == 2 and heads.rank_accuracy is not None
    _, plain = _generate(capsys, model_dir, "--max-new-tokens", "10", "--json")
    code = main(
        ["generate", "--model", str(out), "--prompt", "Hi", "--max-new-tokens", "10", "--json",
         "--speculative", "medusa", "--tree", "[[0], [1], [0, 0], [0, 1], [2]]"]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["token_ids"] == json.loads(plain.out)["token_ids"]


def test_train_medusa_bad_input_leaves_no_files(capsys, model_dir, tmp_path):
    out = tmp_path / "nothing"
    code = main(
        ["train-medusa", "--model", str(model_dir), "--out", str(out), "--corpus",
         str(tmp_path / "missing.txt")]
    )  # fmt: skip
    assert code == 2 and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_option_on_the_saved_model(capsys, model_dir):
    """``--option`` without ``--attention`` sets options on the saved model's layers (the
    retained cache here); an option that would change its parameters is refused."""
    flags = ("--max-new-tokens", "6", "--json")
    code, out = _generate(capsys, model_dir, *flags, "--option", "retain=2")
    assert code == 0 and len(json.loads(out.out)["token_ids"]) == 6
    code, out = _generate(capsys, model_dir, *flags, "--option", "feature_dim=3")
    assert code == 2 and "add or reshape parameters" in out.err
