"""Our decoder against transformers, and prefill + decode against one full forward."""

from __future__ import annotations

import pytest
import torch
import transformers

from linearize.layers.config import ATTENTIONS
from linearize.models import Decoder, ModelConfig, linearize
from linearize.models.convert import from_hf

CAUSAL = [name for name in ATTENTIONS if name != "linformer"]
SMALL = {"size": 5, "conv": "causal", "conv_size": 4}


def tiny_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    )
    return ModelConfig(**{**base, **changes})


def randomize_new_parameters(model: Decoder) -> None:
    """α and conv taps start at zero; give them values so those paths are exercised."""
    for name, p in model.named_parameters():
        if name.endswith("self_attn.alpha"):
            p.data.fill_(0.7)
        elif name.endswith("self_attn.conv"):
            p.data.normal_(0, 0.3)


def test_llama_matches_transformers_exactly():
    hf_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    model = from_hf(hf_config, hf.state_dict()).eval()
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, _ = model(ids)
    assert torch.equal(logits, expected)


def test_qwen2_bias_matches_transformers():
    hf_config = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    model = from_hf(hf_config, hf.state_dict()).eval()
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_matches_transformers():
    hf_config = transformers.GPT2Config(
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    model = from_hf(hf_config, hf.state_dict()).eval()
    ids = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_softmax_prefill_then_decode_matches_full_forward(architecture):
    model = Decoder(tiny_config(architecture=architecture)).double().eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full, _ = model(ids)
        prefix, state = model(ids[:, :13])
        steps = []
        for t in range(13, 20):
            logits, state = model(ids[:, t : t + 1], state=state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CAUSAL)
def test_linearized_forward_equals_prefill_decode_and_uneven_chunks(name):
    model = Decoder(tiny_config()).double().eval()
    linearize(model, {"name": name, **SMALL, "chunk_size": 4})
    randomize_new_parameters(model)
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        full, _ = model(ids, form="parallel")
        prefix, state = model(ids[:, :6], form="chunk")
        steps = []
        for t in range(6, 17):
            logits, state = model(ids[:, t : t + 1], state=state, form="recurrent")
            steps.append(logits)
        decoded = torch.cat([prefix, *steps], 1)
        pieces, state2 = [], None
        for start, end in ((0, 3), (3, 10), (10, 11), (11, 17)):
            logits, state2 = model(ids[:, start:end], state=state2, form="chunk")
            pieces.append(logits)
    torch.testing.assert_close(decoded, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)
    assert state.nbytes() == state2.nbytes()


@pytest.mark.parametrize("name", ["softmax", "augmented", "elu"])
def test_prefill_in_segments_is_the_whole_prompt_at_once(name):
    """``Decoder.prefill`` feeds a prompt in segments, the state carried: the last hidden state
    and the state it leaves are the whole prompt's, and decoding on from it is the same."""
    model = Decoder(tiny_config()).double().eval()
    if name != "softmax":
        linearize(model, {"name": name, **SMALL, "chunk_size": 4})
        randomize_new_parameters(model)
    ids = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        hidden, whole = model.forward_hidden(ids[:, :20])
        for segment in (1, 6, 20, 64):
            last, state = model.prefill(ids[:, :20], segment=segment)
            torch.testing.assert_close(last, hidden[:, -1], rtol=1e-10, atol=1e-10)
            assert state.pos == 20 and state.nbytes() == whole.nbytes()
            on, _ = model(ids[:, 20:], state=state)
            expected, _ = model(ids[:, 20:], state=whole)
            torch.testing.assert_close(on, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("ids", "segment", "message"),
    [
        (torch.zeros(1, 4, dtype=torch.long), 0, "segment=0"),
        (torch.zeros(1, 0, dtype=torch.long), 8, r"\[B, T\] with T ≥ 1"),
        (torch.zeros(4, dtype=torch.long), 8, r"\[B, T\] with T ≥ 1"),
    ],
)
def test_prefill_bad_input(ids, segment, message):
    with pytest.raises(ValueError, match=message):
        Decoder(tiny_config()).prefill(ids, segment=segment)


def test_hybrid_model_keeps_unlisted_layers_softmax():
    model = Decoder(tiny_config(num_layers=3)).double().eval()
    linearize(model, "augmented", layers=[0, 2])
    assert model.attention_names() == ["augmented", "softmax", "augmented"]
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        full, _ = model(ids)
        _, state = model(ids[:, :5])
        for t in range(5, 9):
            logits, state = model(ids[:, t : t + 1], state=state)
    torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=1e-9, atol=1e-9)


def test_linearized_state_size_is_constant():
    model = Decoder(tiny_config()).eval()
    linearize(model, {"name": "augmented", "size": 8, "conv": "causal", "conv_size": 4})
    with torch.no_grad():
        _, short = model(torch.randint(0, 128, (1, 16)))
        _, long = model(torch.randint(0, 128, (1, 2048)), form="chunk")
    assert short.nbytes() == long.nbytes()
    assert long.pos == 2048


def test_softmax_state_grows():
    model = Decoder(tiny_config()).eval()
    with torch.no_grad():
        _, short = model(torch.randint(0, 128, (1, 16)))
        _, long = model(torch.randint(0, 128, (1, 64)))
    assert long.nbytes() == 4 * short.nbytes()


def test_linearize_keeps_pretrained_weights_and_zero_inits_new_parts():
    model = Decoder(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linearize(model, {"name": "augmented", "conv": "causal"})
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    new = sorted(set(after) - set(before))
    parts = ("alpha", "conv", "feature_map.weight")
    assert new == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in parts]
    # α and the taps start at zero (the layer is its window alone); the Hedgehog map, read only
    # through α, starts at identity.
    zeroed = [n for n in new if not n.endswith("feature_map.weight")]
    assert all(float(after[n].abs().sum()) == 0 for n in zeroed)


@pytest.mark.parametrize("name", CAUSAL)
def test_linearize_draws_nothing_from_the_process(name):
    """A conversion's new values are the same whatever the process drew before."""
    base = Decoder(tiny_config())
    converted = []
    for draws in (1, 1000):
        model = Decoder(tiny_config())
        model.load_state_dict(base.state_dict())
        torch.rand(draws)
        converted.append(linearize(model, {"name": name}).state_dict())
    for key, value in converted[0].items():
        assert torch.equal(converted[1][key], value), key


def test_linearize_keep_trained_leaves_layers_already_linearized():
    model = linearize(Decoder(tiny_config()), {"name": "augmented", "size": 8}, layers=[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained"
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    # Layer 0 is kept as it is (the options asked for match it); softmax layer 1 is linearized.
    linearize(model, {"name": "augmented", "size": 8}, keep_trained=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in trained.items())
    assert model.config.attention_config(1).name == "augmented"
    assert float(after["layers.1.self_attn.alpha"].abs().sum()) == 0
    # Options that differ from the kept layer's: an error naming them, nothing changed.
    with pytest.raises(ValueError, match=r"layer 0 already uses augmented with size=8, not 16"):
        linearize(model, {"name": "augmented", "size": 16}, keep_trained=True)
    assert torch.equal(
        model.state_dict()["layers.0.self_attn.alpha"], trained["layers.0.self_attn.alpha"]
    )
    # Another attention, or keep_trained off: linearized afresh.
    linearize(model, "augmented", layers=[0])
    assert float(model.state_dict()["layers.0.self_attn.alpha"].abs().sum()) == 0


@pytest.mark.parametrize(
    "layers, attention, message",
    [
        ([5], "elu", "out of range"),
        ([-1], "elu", "out of range"),
        (None, "linformer", "not causal"),
        (None, "nope", "valid"),
        (None, {"name": "augmented", "hidden_size": 100}, "'hidden_size' is the model's own"),
        (None, {"name": "augmented", "num_heads": 3}, "'num_heads' is the model's own"),
        (None, {"name": "augmented", "kind": "softmax"}, "comes with the attention's name"),
        (None, {"name": "augmented", "feature_dim": 0}, "feature_dim must be >= 1"),
    ],
)
def test_linearize_bad_input(layers, attention, message):
    with pytest.raises(ValueError, match=message):
        linearize(Decoder(tiny_config()), attention, layers=layers)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match="supported"):
        ModelConfig.from_hf(transformers.BertConfig())


def test_token_ids_out_of_vocabulary_rejected():
    with pytest.raises(ValueError, match="token ids"):
        Decoder(tiny_config())(torch.tensor([[0, 500]]))
