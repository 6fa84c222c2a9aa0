"""Group-wise weight quantization: codes, the reference path, save → load, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.models.quantize import (
    QuantConfig,
    dequantize,
    pack,
    quantize,
    quantize_weight,
    unpack,
)
from tests.generation.conftest import text_model, tiny_model


@pytest.mark.parametrize("quant, bound", [("int8", 0.01), ("int4", 0.15)])
def test_dequantized_weight_is_close(quant, bound):
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    config = QuantConfig(quant)
    codes, scale, zero = quantize_weight(w, config)
    assert codes.shape == (48, 96 * config.bits // 8) and scale.shape == (48, 3)
    error = (dequantize(codes, scale, zero, config.bits) - w).norm() / w.norm()
    assert error < bound, f"{quant}: relative error {error:.3e}"


def test_pack_round_trips():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, 4), 4), codes)
    # MatMulNBits' layout: element 2i in the low nibble of byte i.
    assert int(pack(codes, 4)[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4


@pytest.mark.parametrize("kind", ["softmax", "augmented"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantize_save_load_same_logits(kind, quant, tmp_path):
    model = tiny_model(kind).float().eval()
    ids = torch.randint(0, 128, (1, 23))
    quantize(model, quant)
    with torch.no_grad():
        logits, _ = model(ids)
    model.save(tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["quantization"] == {"quant": quant, "group_size": 32, "head_quant": "int8"}
    loaded = linearize.load(tmp_path / "q").eval()
    assert loaded.quantization.quant == quant
    with torch.no_grad():
        again, _ = loaded(ids)
    assert torch.equal(logits, again)


def test_reference_path_runs_every_form():
    """Decode token by token on the quantized model ≡ one forward (the state path works)."""
    model = tiny_model("augmented").float().eval()
    quantize(model, "int4")
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        full, _ = model(ids)
        _, state = model(ids[:, :5])
        steps = []
        for t in range(5, 11):
            logits, state = model(ids[:, t : t + 1], state=state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], rtol=1e-4, atol=1e-4)


def test_bad_input(tmp_path):
    model = tiny_model("softmax").float()
    with pytest.raises(ValueError, match="not a supported bit width"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match="head_quant='none' is not a supported bit width"):
        quantize(model, QuantConfig("int4", head_quant="none"))
    quantize(model, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int8")
    model.save(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        linearize.load(tmp_path / "q", quant="int8")
    assert linearize.load(tmp_path / "q", quant="int4").quantization.quant == "int4"
    odd = linearize.Decoder(
        linearize.ModelConfig(
            vocab_size=64, hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=96
        )
    )
    with pytest.raises(ValueError, match="not a multiple of the quantization group"):
        quantize(odd, "int4")


def test_cli_quantize(tmp_path, capsys):
    source = tmp_path / "fp"
    tiny_model("augmented").float().save(source)
    out = tmp_path / "q4"
    assert main(["quantize", "--model", str(source), "--quant", "int4", "--out", str(out)]) == 0
    assert linearize.load(out).quantization.quant == "int4"
    # Quantizing the quantized directory again fails and leaves no directory behind.
    again = tmp_path / "again"
    assert main(["quantize", "--model", str(out), "--quant", "int8", "--out", str(again)]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not again.exists() and not list(tmp_path.glob(".again*"))
    # --out naming the model being read would replace the fp original: refused, source intact.
    before = (source / "model.safetensors").read_bytes()
    assert main(["quantize", "--model", str(source), "--quant", "int4", "--out", str(source)]) == 2
    assert "is the model being read" in capsys.readouterr().err
    assert (source / "model.safetensors").read_bytes() == before
    assert linearize.load(source).quantization is None


def test_cli_quantize_keeps_the_medusa_heads(tmp_path, capsys):
    from linearize.generation.medusa import MedusaHeads, load_heads, save_with_heads

    source, out = tmp_path / "fp", tmp_path / "q4"
    model = text_model("augmented")
    heads = MedusaHeads.from_model(model)
    save_with_heads(model, heads, source)
    assert main(["quantize", "--model", str(source), "--quant", "int4", "--out", str(out)]) == 0
    assert "its 4 Medusa heads kept" in capsys.readouterr().out
    kept = load_heads(out)
    for a, b in zip(heads.state_dict().values(), kept.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The quantized directory speculates with them, and gives plain decoding's tokens.
    argv = ["generate", "--model", str(out), "--prompt", "Hi", "--max-new-tokens", "8", "--json"]
    argv += ["--engine", "torch"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    tree = "[[0], [1], [0, 0], [0, 1], [2]]"
    assert main([*argv, "--speculative", "medusa", "--tree", tree]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == plain["token_ids"]


def test_export_hf_of_a_quantized_model_holds_its_weights_dequantized(tmp_path, capsys):
    model = tiny_model("augmented").float().eval()
    quantize(model, "int4")
    model.save(tmp_path / "q4")
    assert main(["export-hf", "--model", str(tmp_path / "q4"), "--out", str(tmp_path / "hf")]) == 0
    assert "int4 weights exported dequantized to float32" in capsys.readouterr().out
    exported = linearize.load(tmp_path / "hf")
    assert exported.quantization is None
    ids = torch.randint(0, 128, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)
    # An existing folder is replaced only with --overwrite; never the model being read.
    argv = ["export-hf", "--model", str(tmp_path / "q4"), "--out", str(tmp_path / "hf")]
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "q4"), "--overwrite"]) == 2
    assert "is the model being read" in capsys.readouterr().err
    assert linearize.load(tmp_path / "q4").quantization.quant == "int4"


@pytest.mark.parametrize("kind", ["softmax", "augmented"])
def test_bf16_weights_save_load_and_decode(kind, tmp_path):
    """bf16: every linear, the embedding and the tied head in bfloat16, activations in fp32;
    logits near fp32's, bit for bit the same after save → load, decoding ≡ one forward."""
    model = tiny_model(kind).float().eval()
    ids = torch.randint(0, 128, (1, 23))
    with torch.no_grad():
        fp32, _ = model(ids)
    quantize(model, "bf16")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits, _ = model(ids)
        _, state = model(ids[:, :15])
        steps = []
        for t in range(15, 23):
            step, state = model(ids[:, t : t + 1], state=state)
            steps.append(step)
    assert logits.dtype == torch.float32 and not torch.equal(logits, fp32)
    error = (logits - fp32).norm() / fp32.norm()
    assert error < 2e-2, f"bf16 logits off fp32 by {error:.3e}"
    torch.testing.assert_close(torch.cat(steps, 1), logits[:, 15:], rtol=1e-4, atol=1e-4)
    model.save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["quantization"] == {"quant": "bf16", "group_size": 32, "head_quant": "bf16"}
    loaded = linearize.load(tmp_path / "b").eval()
    with torch.no_grad():
        again, _ = loaded(ids)
    assert torch.equal(logits, again)
    with pytest.raises(ValueError, match="already quantized"):
        linearize.load(tmp_path / "b", quant="int4")


def test_bf16_is_not_mixed_with_coded_heads_and_runs_on_torch():
    from linearize.engine import resolve_engine

    with pytest.raises(ValueError, match="bf16 goes with bf16"):
        QuantConfig("bf16").validate()
    with pytest.raises(ValueError, match="bf16 goes with bf16"):
        QuantConfig("int4", head_quant="bf16").validate()
    model = quantize(tiny_model("augmented").float(), "bf16")
    assert resolve_engine("auto", model) == "torch"


def test_info_counts_quantized_weights(tmp_path, capsys):
    model = tiny_model("augmented").float()
    before = sum(p.numel() for p in model.parameters())
    quantize(model, "int4").save(tmp_path / "q")
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == before and summary["quantization"] == "int4"
