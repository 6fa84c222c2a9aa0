"""Save and load: exact round trips, atomic writes, clear errors for broken directories."""

from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize.layers.config import ATTENTIONS, attention_config
from linearize.models import Decoder, ModelConfig
from linearize.models.quantize import quantize


def tiny(**changes) -> Decoder:
    base = dict(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    )
    return Decoder(ModelConfig(**{**base, **changes})).eval()


@pytest.mark.parametrize("attention", ["augmented", "hedgehog", "performer", "softmax"])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_bit_identical(tmp_path, attention, tie):
    model = tiny(tie_embeddings=tie)
    linearize.linearize(model, attention, layers=[1])
    for name, p in model.named_parameters():
        if "alpha" in name or name.endswith(".conv"):
            p.data.normal_()
    model.save(tmp_path / "m")
    loaded = linearize.load(tmp_path / "m")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert loaded.config.to_dict() == model.config.to_dict() or loaded.attention_names() == (
        model.attention_names()
    )
    assert loaded.attention_names() == model.attention_names()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "linearize" and config["format_version"] == 1
    assert config["model"]["attention"][1]["name"] == attention


CAUSAL = sorted(name for name in ATTENTIONS if attention_config(name).is_causal)


@pytest.mark.parametrize("attention", CAUSAL)
@pytest.mark.parametrize("quant", [None, "int4", "bf16"])
def test_load_fills_every_tensor(tmp_path, attention, quant):
    """A saved model loads into memory that is never randomly initialised (built on the meta
    device): every parameter and buffer equals the saved model's, the computed buffers no file
    holds (RoPE's inverse frequencies, a hash's bit weights) included, and a tied head stays
    tied."""
    model = tiny()
    linearize.linearize(model, attention, layers=[1])
    if quant is not None:
        quantize(model, quant)
    model.save(tmp_path / "m")
    loaded = linearize.load(tmp_path / "m")
    for kind in ("parameters", "buffers"):
        saved = dict(getattr(model, f"named_{kind}")())
        got = dict(getattr(loaded, f"named_{kind}")())
        assert saved.keys() == got.keys()
        for name, tensor in saved.items():
            assert torch.equal(tensor, got[name]), f"{kind[:-1]} {name}"
    weight = "qweight" if quant == "int4" else "weight"
    assert getattr(loaded.lm_head, weight) is getattr(loaded.embed_tokens, weight)


def test_save_replaces_existing_directory_atomically(tmp_path):
    model = tiny()
    model.save(tmp_path / "m")
    model.save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_save_leaves_previous_model(tmp_path):
    model = tiny()
    model.save(tmp_path / "m")

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    model.tokenizer = Broken()
    with pytest.raises(OSError):
        model.save(tmp_path / "m")
    assert linearize.load(tmp_path / "m") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny().save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        linearize.load(tmp_path / "m")


def test_missing_config_is_clear(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        linearize.load(tmp_path / "m")


def test_unsupported_architecture_in_saved_config(tmp_path):
    tiny().save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["model"]["architecture"] = "mamba"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mamba"):
        linearize.load(tmp_path / "m")


def test_unknown_model_name_lists_builtins():
    with pytest.raises(ValueError, match="smollm2-135m"):
        linearize.load("not-a-model")


def test_a_training_run_directory_stands_for_its_model(tmp_path):
    model = tiny()
    run = tmp_path / "run"
    model.save(run / "model")
    (run / "config.json").write_text(json.dumps({"model": "smollm2-135m", "stage": "both"}))
    loaded = linearize.load(run)
    ids = torch.randint(128, (1, 5))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.json").write_text(json.dumps({"model": "smollm2-135m"}))
    with pytest.raises(ValueError, match="without a saved model yet"):
        linearize.load(unfinished)


@pytest.mark.parametrize("attention", ["augmented", "hedgehog", "t2r", "yoso"])
def test_load_imports_no_compiler(tmp_path, attention):
    """Loading builds the model on the meta device without computing its initial values there
    (``eye``, ``pow``, ``normal_`` on meta tensors import ``torch._dynamo``: a second of every
    process that loads a model), and still fills every tensor (``test_load_fills_every_tensor``)."""
    import subprocess
    import sys

    model = tiny()
    if attention != "augmented":
        linearize.linearize(model, attention_config(attention))
    model.save(tmp_path / "m")
    code = (
        "import sys, linearize\n"
        f"linearize.load({str(tmp_path / 'm')!r})\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
