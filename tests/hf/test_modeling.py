"""The transformers classes: exact logits, generate() ≡ linearize generate, save/reload, beams."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from linearize.generation import GenerationConfig, generate
from linearize.hf import LinearizeCache, LinearizeForCausalLM, export_hf
from tests.generation.conftest import KINDS, tiny_model

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 23, 7, 1, 88]])  # 11 tokens: crosses groups of 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple]:
    """``kind -> (our model, the transformers model loaded from its export)``."""
    out = {}
    for kind in KINDS:
        # float32 (what our loader and transformers' give): RoPE's inv_freq stays float32 in both.
        model = tiny_model(kind).float()
        directory = tmp_path_factory.mktemp(kind) / "hf"
        export_hf(model, directory)
        out[kind] = (model, AutoModelForCausalLM.from_pretrained(directory), directory)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_ours_exactly(exported, kind):
    ours, hf, _ = exported[kind]
    assert isinstance(hf, LinearizeForCausalLM)
    assert hf.dtype == torch.float32
    expected, _ = ours(PROMPT)
    assert torch.equal(hf(PROMPT).logits, expected)


@pytest.mark.parametrize("kind", ["softmax", "augmented", "hybrid"])
def test_greedy_generate_equals_linearize_generate(exported, kind):
    ours, hf, _ = exported[kind]
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[])
    expected = generate(ours, PROMPT[0].tolist(), config).token_ids
    out = hf.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out[0, PROMPT.shape[1] :].tolist() == expected


@pytest.mark.parametrize("kind", ["augmented", "hybrid"])
def test_beam_search_reorders_the_state_exactly(exported, kind):
    """Beams decoded on the cache equal beams recomputed from scratch every step."""
    _, hf, _ = exported[kind]
    options = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False)
    cached = hf.generate(PROMPT, pad_token_id=0, **options)
    scratch = hf.generate(PROMPT, pad_token_id=0, use_cache=False, **options)
    assert torch.equal(cached, scratch)


def test_save_pretrained_reloads_to_the_same_logits(exported, tmp_path):
    _, hf, _ = exported["hybrid"]
    hf.save_pretrained(tmp_path / "again")
    names = {p.name for p in (tmp_path / "again").iterdir()}
    assert {"modeling_linearize.py", "configuration_linearize.py", "model.safetensors"} <= names
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again(PROMPT).logits, hf(PROMPT).logits)


def test_the_cache_holds_a_fixed_size_state(exported):
    _, hf, _ = exported["augmented"]
    out = hf(PROMPT, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, LinearizeCache)
    sizes = []
    for step in range(30):
        out = hf(torch.tensor([[step + 2]]), cache=cache)
        sizes.append(cache.nbytes())
    assert cache.get_seq_length() == PROMPT.shape[1] + 30
    assert sizes[9] == sizes[29]


def test_assisted_decoding_and_cropping_are_refused(exported):
    _, hf, _ = exported["augmented"]
    with pytest.raises(ValueError, match="stateful"):
        hf.generate(PROMPT, max_new_tokens=3, assistant_model=hf, pad_token_id=0)
    with pytest.raises(ValueError, match="cannot be cropped"):
        LinearizeCache().crop(2)


def test_padding_is_refused(exported):
    _, hf, _ = exported["augmented"]
    mask = torch.ones_like(PROMPT)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding is not supported"):
        hf(PROMPT, attention_mask=mask)
    assert torch.equal(hf(PROMPT, attention_mask=torch.ones_like(PROMPT)).logits, hf(PROMPT).logits)


def test_labels_give_the_shifted_cross_entropy(exported):
    _, hf, _ = exported["augmented"]
    out = hf(PROMPT, labels=PROMPT)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], PROMPT[0, 1:])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["augmented", "hybrid"])
def test_generates_prefill_runs_in_segments_and_keeps_the_last_logits(exported, kind, monkeypatch):
    """generate() asks for the last position's logits (``logits_to_keep=1``): the prompt then
    runs in segments (``Decoder.prefill``), with the same logits and state as in one piece."""
    from linearize.models.decoder import PREFILL_SEGMENT

    _, hf, _ = exported[kind]
    ids = torch.randint(0, hf.config.vocab_size, (1, PREFILL_SEGMENT + 37))
    with torch.no_grad():
        whole = hf(ids, use_cache=True)
        lengths, forward_hidden = [], hf.model.forward_hidden

        def spy(input_ids, **kwargs):
            lengths.append(input_ids.shape[1])
            return forward_hidden(input_ids, **kwargs)

        monkeypatch.setattr(hf.model, "forward_hidden", spy)
        last = hf(ids, use_cache=True, logits_to_keep=1)
        monkeypatch.undo()
        assert lengths == [PREFILL_SEGMENT, 37]
        torch.testing.assert_close(last.logits, whole.logits[:, -1:], rtol=1e-4, atol=1e-4)
        nxt = torch.tensor([[3]])
        caches = [
            out.cache if hasattr(out, "cache") else out.past_key_values for out in (whole, last)
        ]
        a, b = (hf(nxt, cache=c).logits for c in caches)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert caches[1].get_seq_length() == ids.shape[1] + 1  # the prompt and the next token


def test_from_config_builds_our_model(exported):
    """``AutoModelForCausalLM.from_config`` on our config: the real class, the same shapes."""
    from transformers import AutoConfig

    _, hf, directory = exported["augmented"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    assert isinstance(model, LinearizeForCausalLM)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in hf.state_dict().items()}


def test_import_leaves_the_model_classes_for_later():
    """``import linearize`` registers with the Auto classes without importing transformers'
    model classes or peft (~2 s of every command), and the CLI's parser imports neither them
    nor the server's web stack: they come with their first use."""
    import subprocess
    import sys

    heavy = ["transformers.modeling_utils", "transformers.generation.utils", "peft"]
    heavy += ["fastapi", "httpx"]  # (the server and its benchmark: imported by their commands)
    code = (
        "import sys, linearize\n"
        "from linearize.cli import build_parser\n"
        "build_parser()\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
