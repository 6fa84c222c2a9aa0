"""Options set on a converted model (``reconfigure``, ``--option`` without ``--attention``):
every parameter kept, the model then behaves as one built with the options; options that would
add or reshape a parameter are refused and leave the model as it was."""

from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.models import reconfigure
from tests.eval.conftest import tiny_config, tiny_tokenizer
from tests.generation.conftest import GROUP, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def test_reconfigure_keeps_parameters_and_matches_a_model_built_with_the_options():
    model = tiny_model("augmented")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (1, 6 * GROUP))
    plain = _logits(model, ids)
    reconfigure(model, {"retain": 2})
    assert all(model.config.attention_config(i).retain == 2 for i in range(2))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # Before any token leaves a window nothing changes; past it, the retained tokens are read.
    torch.testing.assert_close(_logits(model, ids[:, :GROUP]), plain[:, :GROUP], rtol=0, atol=1e-12)
    assert not torch.allclose(_logits(model, ids), plain)
    built = tiny_model("augmented")
    linearize.linearize(built, {**built.config.attention[0], "retain": 2}, keep_trained=False)
    built.load_state_dict(before)
    torch.testing.assert_close(_logits(model, ids), _logits(built.double(), ids))


def test_reconfigure_refuses_what_would_change_parameters():
    model = tiny_model("augmented")
    before = [dict(options) for options in model.config.attention]
    with pytest.raises(ValueError, match="add or reshape parameters"):
        reconfigure(model, {"feature_dim": 3})
    with pytest.raises(ValueError, match="retain.*>= 0: -1"):
        reconfigure(model, {"retain": -1})
    with pytest.raises(ValueError, match="belong to linearize"):
        reconfigure(model, {"name": "elu"})
    assert model.config.attention == before
    with pytest.raises(ValueError, match="no linear attention layer"):
        reconfigure(tiny_model("softmax"), {"retain": 2})
    # All or none: the hybrid's layer 1 takes the window, layer 0 (softmax) is not touched; a
    # refusal on the last layer undoes the first.
    hybrid = tiny_model("augmented", layers=3)
    linearize.linearize(hybrid, "elu", layers=[2])
    modules = [layer.self_attn for layer in hybrid.layers]
    with pytest.raises(ValueError, match="retain=2 needs a softmax window"):
        reconfigure(hybrid, {"retain": 2})
    assert [layer.self_attn for layer in hybrid.layers] == modules
    assert hybrid.config.attention_config(0).retain == 32  # the default, as built


def test_eval_option_on_a_converted_model(tmp_path, capsys):
    source = linearize.Decoder(tiny_config())
    source.tokenizer = tiny_tokenizer()
    source.save(tmp_path / "model")
    converted = tmp_path / "converted"
    argv = ["--attention", "augmented", "--group-size", "8", "--out", str(converted)]
    assert main(["convert", "--model", str(tmp_path / "model"), *argv]) == 0
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 40)
    ppl = ["eval", "ppl", "--model", str(converted), "--data", str(text), "--window", "64"]
    scores = {}
    for options in ([], ["--option", "retain=4"]):
        capsys.readouterr()
        assert main([*ppl, *options, "--json"]) == 0
        scores[len(options)] = json.loads(capsys.readouterr().out)["ppl"]
    assert scores[0] != scores[2]
    assert main([*ppl, "--option", "feature_dim=3"]) == 2
    assert "add or reshape parameters" in capsys.readouterr().err
