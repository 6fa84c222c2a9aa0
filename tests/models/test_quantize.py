"""Group-wise weight quantization: codes, the reference path, save → load, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.models.quantize import (
    QuantConfig,
    QuantizedLinear,
    _linears,
    dequantize,
    gptq_weight,
    input_moments,
    keep_dequantized,
    on_half_grid,
    pack,
    quantize,
    quantize_weight,
    unpack,
    whole_zero_points,
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


def test_int4_grids():
    """Whole zero points (the default): each weight within half a step of its code's value.
    Q4_1's float grid: weights already on a Q4_1 grid (a GGUF's) come back exactly."""
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    codes, scale, zero = quantize_weight(w, QuantConfig("int4"))
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 15
    step = scale.repeat_interleave(32, 1)
    assert ((dequantize(codes, scale, zero, 4) - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert not on_half_grid(scale, -zero * scale)  # (float32 scales: the engine reads them so)
    # A Q4_1 grid as a GGUF holds it: a float16 minimum and scale per group, 16 levels.
    levels = torch.randint(0, 16, (48, 96)).float()
    lo, s = torch.rand(48, 3, 1) - 1.3, torch.rand(48, 3, 1) * 0.1 + 0.01
    lo, s = lo.half().float(), s.half().float()
    q4_1 = (lo + levels.view(48, 3, 32) * s).view(48, 96)
    q4_1[:, ::32], q4_1[:, 1::32] = lo[..., 0], (lo + 15 * s)[..., 0]  # each group's ends
    float_grid = QuantConfig("int4", zero_points="float")
    codes, scale, zero = quantize_weight(q4_1, float_grid)
    torch.testing.assert_close(dequantize(codes, scale, zero, 4), q4_1)
    # its scales and minima (the bases) float16 values again
    assert torch.equal(scale, s[..., 0]) and on_half_grid(scale, -zero * scale)
    error = (dequantize(*quantize_weight(q4_1, QuantConfig("int4")), 4) - q4_1).abs().amax()
    assert error > 1e-3  # (whole zero points cannot hold a float minimum)


def test_auto_zero_points_follow_the_weights():
    """``zero_points="auto"``: Q4_1's grid for a model whose linears lie on it (a Q4_1 GGUF's),
    whole zero points for any other; the config records the choice."""
    model = tiny_model("augmented").float().eval()
    quantize(model, "int4")
    assert model.quantization.zero_points == "integer"
    on_grid = tiny_model("augmented").float().eval()
    float_grid = QuantConfig("int4", zero_points="float")
    with torch.no_grad():
        for _, _, linear in _linears(on_grid):
            linear.weight.copy_(dequantize(*quantize_weight(linear.weight, float_grid), 4))
    quantize(on_grid, "int4")
    assert on_grid.quantization.zero_points == "float"
    assert all(not whole_zero_points(w.zero, 4) for w in _weights(on_grid))


def _weights(model):

    return [
        m.qweight for m in model.modules() if isinstance(m, QuantizedLinear) and m.qweight.bits == 4
    ]


def test_older_directories_load_with_float_zero_points(tmp_path):
    """A directory saved before ``zero_points`` was recorded holds Q4_1's float zero points."""
    model = tiny_model("augmented").float().eval()
    quantize(model, QuantConfig("int4", zero_points="float"))
    model.save(tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    meta = json.loads(path.read_text())
    del meta["quantization"]["zero_points"]
    path.write_text(json.dumps(meta))
    loaded = linearize.load(tmp_path / "q")
    assert loaded.quantization.zero_points == "float"
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded.eval()(ids)[0])


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
    assert meta["quantization"] == {
        "quant": quant,
        "group_size": 32,
        "head_quant": "int8",
        "method": "round",
        "zero_points": "integer",
    }
    loaded = linearize.load(tmp_path / "q").eval()
    assert loaded.quantization.quant == quant
    with torch.no_grad():
        again, _ = loaded(ids)
    assert torch.equal(logits, again)


def _correlated_inputs(n: int, k: int) -> torch.Tensor:
    """Inputs whose features move together (as a layer's do), so carried errors can cancel."""
    torch.manual_seed(1)
    return torch.randn(n, k // 4) @ torch.randn(k // 4, k) + 0.1 * torch.randn(n, k)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_gptq_moves_the_outputs_less_than_the_nearest_codes(quant):
    config = QuantConfig(quant)
    x = _correlated_inputs(512, 128)
    codes, scale, zero = quantize_weight(torch.randn(40, 128), config)
    # The fine-tune case: weights moved off their grid by less than half a code's step, which
    # the nearest codes undo.
    step = scale.repeat_interleave(config.group_size, 1)
    w = dequantize(codes, scale, zero, config.bits) + 0.2 * step * torch.randn(40, 128).clamp(-2, 2)

    def output_error(codes, scale, zero) -> float:
        return float((x @ (dequantize(codes, scale, zero, config.bits) - w).T).norm())

    nearest = output_error(*quantize_weight(w, config))
    gptq = output_error(*gptq_weight(w, x.T @ x, config))
    assert gptq < 0.8 * nearest, f"{quant}: GPTQ {gptq:.4g} against nearest {nearest:.4g}"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_gptq_keeps_weights_already_on_the_grid(quant):
    config = QuantConfig(quant)
    x = _correlated_inputs(256, 96)
    coded = quantize_weight(torch.randn(24, 96), config)
    w = dequantize(*coded, config.bits)
    codes, scale, zero = gptq_weight(w, x.T @ x, config)
    assert torch.equal(codes, coded[0])
    torch.testing.assert_close(dequantize(codes, scale, zero, config.bits), w)


def test_quantize_with_calibration_codes_every_linear_by_gptq(tmp_path):
    model = tiny_model("augmented").float().eval()
    calibration = torch.randint(0, 128, (300,))
    moments = input_moments(model, calibration, block=128)
    K = model.config.hidden_size
    assert model.lm_head in moments and moments[model.lm_head].shape == (K, K)
    assert len(moments) == 1 + 7 * model.config.num_layers  # q, k, v, o, gate, up, down; head
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        reference, _ = model(ids)
    nearest = quantize(tiny_model("augmented").float().eval(), "int4")
    calls = []
    quantize(model, "int4", calibration=calibration, progress=lambda *a: calls.append(a))
    assert model.quantization.method == "gptq"
    # Progress: the one block of calibration read, then every linear and the tied table coded.
    coded = 7 * model.config.num_layers + 1
    assert calls == [("calibration", 1, 1)] + [("codes", i, coded) for i in range(1, coded + 1)]
    with torch.no_grad():
        logits, _ = model(ids)
        assert not torch.equal(logits, nearest(ids)[0])
    model.save(tmp_path / "q")
    loaded = linearize.load(tmp_path / "q").eval()
    assert loaded.quantization.method == "gptq"
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], logits)
    assert torch.isfinite(logits).all()


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


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_keep_dequantized_gives_the_same_logits_and_saves_nothing_more(quant, tmp_path):
    model = quantize(tiny_model("augmented").float().eval(), quant)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        want, _ = model(ids)
    saved = set(model.state_dict())
    linears = [m for m in model.modules() if hasattr(m, "dense")]
    added = keep_dequantized(model)
    assert added == sum(m.out_features * m.in_features * 4 for m in linears) > 0
    assert keep_dequantized(model) == 0  # once
    with torch.no_grad():
        again, _ = model(ids)
    assert torch.equal(want, again)
    assert set(model.state_dict()) == saved
    model.save(tmp_path / "q")
    loaded = linearize.load(tmp_path / "q")
    assert all(m.dense is None for m in loaded.modules() if hasattr(m, "dense"))


def test_bad_input(tmp_path):
    model = tiny_model("softmax").float()
    with pytest.raises(ValueError, match="not a supported bit width"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match="head_quant='none' is not a supported bit width"):
        quantize(model, QuantConfig("int4", head_quant="none"))
    with pytest.raises(ValueError, match="method='best'; allowed: \\['round', 'gptq'\\]"):
        quantize(model, QuantConfig("int4", method="best"))
    with pytest.raises(ValueError, match="pass calibration"):
        quantize(model, QuantConfig("int4", method="gptq"))
    with pytest.raises(ValueError, match="bf16 has no codes"):
        quantize(model, "bf16", calibration=torch.arange(10))
    with pytest.raises(ValueError, match="1-D with >= 2 tokens"):
        quantize(model, "int4", calibration=torch.arange(10)[None])
    assert linearize.models.quantize.quant_config(model) is None  # nothing half-done
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
    argv = ["quantize", "--model", str(source), "--quant", "int4", "--out", str(out)]
    # GPTQ's calibration text (the default) needs a tokenizer: refused, with what to do.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "--calibration none" in err
    assert not out.exists()
    assert main([*argv, "--calibration", "none"]) == 0
    assert "(round codes, whole zero points)" in capsys.readouterr().out  # random weights: auto
    assert linearize.load(out).quantization.quant == "int4"
    q4_1 = tmp_path / "q4_1"
    assert main([*argv[:-1], str(q4_1), "--calibration", "none", "--zero-points", "float"]) == 0
    assert "(round codes, Q4_1's float zero points)" in capsys.readouterr().out
    assert linearize.load(q4_1).quantization.zero_points == "float"
    # Quantizing the quantized directory again fails and leaves no directory behind.
    again = tmp_path / "again"
    assert main(["quantize", "--model", str(out), "--quant", "int8", "--out", str(again)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is already quantized (int4)" in err and "it/s" not in err  # no bar drawn
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
    argv = ["quantize", "--model", str(source), "--quant", "int4", "--out", str(out)]
    assert main([*argv, "--calibration-tokens", "300"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "calibration" in captured.err and "codes" in captured.err  # both stages show
    assert "its 4 Medusa heads kept" in printed and "(gptq codes, " in printed
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
    assert meta["quantization"] == {
        "quant": "bf16",
        "group_size": 32,
        "head_quant": "bf16",
        "method": "round",
        "zero_points": "auto",
    }
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
