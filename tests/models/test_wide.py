"""Wide layers: widening keeps every parameter, changes only what lies past the old window,
keeps the state fixed, saves and loads; the greedy choice leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize import Decoder
from linearize.cli import main
from linearize.models import reconfigure
from linearize.models.wide import (
    _layer_inputs,
    _unchanged_prefix,
    can_widen,
    choose_wide_layers,
    recall_loss,
    recall_probes,
    wide_size,
    wide_window,
    widen,
    widen_best,
)
from linearize.train.config import TrainConfig
from tests.eval.conftest import tiny_config, tiny_tokenizer
from tests.generation.conftest import GROUP, tiny_model


class CharTokenizer:
    """One id per character (ids < 128), enough for the recall probes."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def test_widen_keeps_parameters_and_changes_only_the_far_past():
    model = tiny_model("augmented", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    short = torch.randint(0, 128, (1, GROUP))
    long = torch.randint(0, 128, (1, 4 * GROUP))
    short_before, long_before = _logits(model, short), _logits(model, long)
    widen(model, [1], 6 * GROUP)
    assert model.config.attention_config(1).size == 6 * GROUP
    assert model.config.attention_config(0).size == GROUP
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # Inside the old window nothing changes; past it, layer 1 now sees more.
    torch.testing.assert_close(_logits(model, short), short_before, rtol=0, atol=1e-12)
    assert not torch.allclose(_logits(model, long), long_before)


def test_wide_model_decodes_with_a_fixed_state_and_saves(tmp_path):
    model = tiny_model("augmented", layers=3)
    widen(model, [0, 2], 3 * GROUP)
    ids = torch.randint(0, 128, (1, 8 * GROUP))
    full = _logits(model, ids)
    with torch.no_grad():
        _, state = model(ids[:, : 4 * GROUP])
        nbytes = state.nbytes()
        steps = []
        for t in range(4 * GROUP, 8 * GROUP):
            logits, state = model(ids[:, t : t + 1], state=state)
            steps.append(logits)
    assert state.nbytes() == nbytes
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4 * GROUP :], rtol=1e-9, atol=1e-9)
    model.save(tmp_path / "wide")
    loaded = linearize.load(tmp_path / "wide").double().eval()
    assert [loaded.config.attention_config(i).size for i in range(3)] == [
        3 * GROUP,
        GROUP,
        3 * GROUP,
    ]
    assert torch.equal(_logits(loaded, ids), full)


def test_greedy_choice_leaves_the_model_as_it_was():
    model = tiny_model("augmented", layers=3)
    model.tokenizer = CharTokenizer()
    options = [dict(a) for a in model.config.attention]
    modules = [layer.self_attn for layer in model.layers]
    ids = torch.randint(0, 128, (1, 3 * GROUP))
    before = _logits(model, ids)
    chosen = choose_wide_layers(model, 2, 6 * GROUP, length=4 * GROUP + 8, probes=2)
    again = choose_wide_layers(model, 2, 6 * GROUP, length=4 * GROUP + 8, probes=2)
    assert chosen == again == sorted(chosen) and len(set(chosen)) == 2
    assert model.config.attention == options
    assert all(a is layer.self_attn for a, layer in zip(modules, model.layers, strict=True))
    assert torch.equal(_logits(model, ids), before)
    # One layer: the one whose widening gives the probes the lowest loss, through the windows
    # alone (the default layer's retained cache is off while the probes run).
    (best,) = choose_wide_layers(model, 1, 6 * GROUP, length=4 * GROUP + 8, probes=2)
    probes = recall_probes(model.tokenizer, 4 * GROUP + 8, 2)
    losses = {}
    for i in range(3):
        wide = reconfigure(tiny_model("augmented", layers=3), {"retain": 0})
        losses[i] = recall_loss(widen(wide, [i], 6 * GROUP), probes)
    assert best == min(losses, key=losses.__getitem__), losses


def test_recall_loss_runs_only_past_the_unchanged_prefix():
    """The choice reruns layer ``i`` on, and only on the tokens past the first ``size + sinks``
    (which no widening changes), from states recorded before widening: the same loss as the
    whole widened model on the whole probe."""
    tokenizer = CharTokenizer()
    probes = recall_probes(tokenizer, 4 * GROUP + 8, 2)
    for i in range(3):
        model = tiny_model("augmented", layers=3)
        prefix = _unchanged_prefix(model, [0, 1, 2])
        assert prefix == GROUP + model.config.attention_config(0).sinks
        inputs = _layer_inputs(model, probes, prefix)
        too_long = _layer_inputs(model, probes, 3 * GROUP)
        widen(model, [i], 6 * GROUP)
        full = recall_loss(model, probes)
        assert recall_loss(model, probes, i, inputs) == pytest.approx(full, rel=1e-9)
        if i < 2:  # later layers' recorded states past the narrow window are stale: it shows
            assert recall_loss(model, probes, i, too_long) != pytest.approx(full, rel=1e-6)


def test_bad_input():
    softmax = tiny_model("softmax")
    assert not can_widen(softmax, 0)
    with pytest.raises(ValueError, match="cannot be widened"):
        widen(softmax, [0], 64)
    model = tiny_model("augmented")
    with pytest.raises(ValueError, match="cannot be widened"):
        widen(model, [5], 64)
    with pytest.raises(ValueError, match="narrower"):
        widen(model, [0], GROUP - 1)
    with pytest.raises(ValueError, match="tokenizer"):
        choose_wide_layers(model, 1)
    model.tokenizer = CharTokenizer()
    with pytest.raises(ValueError, match="asked for 3"):
        choose_wide_layers(model, 3)
    with pytest.raises(ValueError, match="do not reach past the windows"):
        choose_wide_layers(model, 1, length=GROUP)
    assert wide_size(model, 0) == model.config.max_position_embeddings - 4
    assert wide_window(model) == wide_window(model, 10**9) == wide_size(model, 0)
    assert wide_window(model, 64) == 64 and wide_window(softmax) is None
    with pytest.raises(ValueError, match="wide_layers must be >= 0"):
        TrainConfig(wide_layers=-1).validate()


def test_widen_best_widens_the_greedy_choice_at_most_as_many_as_there_are():
    model = tiny_model("augmented", layers=3)
    model.tokenizer = CharTokenizer()
    (expected,) = choose_wide_layers(model, 1, 6 * GROUP)
    assert widen_best(model, 1, 6 * GROUP) == [expected]
    sizes = [model.config.attention_config(i).size for i in range(3)]
    assert sizes == [6 * GROUP if i == expected else GROUP for i in range(3)]
    # A layer already wide counts: asked for one again, nothing changes (no probes run: a model
    # without a tokenizer would fail them).
    model.tokenizer = None
    assert widen_best(model, 1, 6 * GROUP) == [expected]
    assert [model.config.attention_config(i).size for i in range(3)] == sizes
    # Asked for more than there are: all of them.
    model.tokenizer = CharTokenizer()
    assert widen_best(model, 10, 6 * GROUP) == [0, 1, 2]
    assert widen_best(model, 2, 6 * GROUP) == [0, 1, 2]  # never narrowed
    assert widen_best(tiny_model("softmax"), 2) == []
    with pytest.raises(ValueError, match="must be >= 0"):
        widen_best(model, -1)


def test_convert_wide_layers(tmp_path, capsys):
    source = linearize.Decoder(tiny_config())
    source.tokenizer = tiny_tokenizer()
    source.save(tmp_path / "model")
    argv = ["convert", "--model", str(tmp_path / "model")]
    out = tmp_path / "wide"
    wide = [*argv, "--attention", "augmented", "--group-size", "8", "--wide-layers", "1"]
    wide += ["--wide-size", "24"]
    assert main([*wide, "--out", str(out)]) == 0
    (layer,) = [
        int(i) for i in capsys.readouterr().out.split("wide layers: ")[1].split()[0].split(",")
    ]
    loaded = linearize.load(out)
    assert [loaded.config.attention_config(i).size for i in range(2)] == [
        24 if i == layer else 8 for i in range(2)
    ]
    # `info` shows each layer's window: the wide one stands out.
    assert main(["info", str(out), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["attention"]
    assert runs == [
        {"layers": str(i), "attention": "augmented", "window": 24 if i == layer else 8}
        for i in range(2)
    ]
    for bad, message in (
        ([*argv, "--attention", "elu", "--wide-layers", "1"], "no layer of this elu model"),
        ([*argv, "--attention", "augmented", "--wide-layers", "-1"], "--wide-layers must be >= 0"),
        ([*argv, "--attention", "augmented", "--option", "name=elu"], "pass --attention instead"),
    ):
        assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_a_trained_model_trains_on_with_its_attention_and_wide_layers(tmp_path):
    from linearize.train.pipeline import build_model

    model = linearize.linearize(Decoder(tiny_config()), {"name": "augmented", "size": 8})
    widen(model, [1], 24)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained"
    model.save(tmp_path / "trained")
    trained = linearize.load(tmp_path / "trained").state_dict()
    # The command that trained it, run again on it: nothing is re-initialised or re-chosen (the
    # model has no tokenizer, so running the recall probes would fail).
    config = TrainConfig(
        model=str(tmp_path / "trained"),
        attention_options={"size": 8},
        wide_layers=1,
        wide_size=24,
    )
    built = build_model(config)
    assert [built.config.attention_config(i).size for i in range(2)] == [8, 24]
    assert all(torch.equal(built.state_dict()[k], v) for k, v in trained.items())
