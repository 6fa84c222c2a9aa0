"""The decode loop: greedy ≡ recomputation from scratch, sampling controls and seeds, batches,
streaming text, stop conditions, chat prompts, bad inputs."""

from __future__ import annotations

import pytest
import torch

from linearize.generation import (
    GenerationConfig,
    MedusaHeads,
    Sampler,
    SamplingConfig,
    generate,
    generate_batch,
    stream,
)
from linearize.generation.streaming import TextStream, encode_prompt
from tests.generation.conftest import byte_tokenizer, text_model, tiny_model

PROMPT = [7, 1, 4, 2, 8]


def test_greedy_equals_recomputing_from_scratch(kind):
    model = tiny_model(kind)
    result = generate(model, PROMPT, GenerationConfig(max_new_tokens=12))
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor([ids]), form="parallel")
            ids.append(int(logits[0, -1].argmax()))
    assert result.token_ids == ids[len(PROMPT) :]
    assert result.forward_passes == 11 and result.mean_accepted == 1.0
    assert result.finish_reason == "length"


def test_seeded_sampling_is_reproducible():
    model = tiny_model("augmented")
    config = GenerationConfig(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    first = generate(model, PROMPT, config).token_ids
    assert generate(model, PROMPT, config).token_ids == first
    config.seed = 4
    assert generate(model, PROMPT, config).token_ids != first


def test_temperature_zero_ignores_the_seed():
    model = tiny_model("hybrid")
    greedy = generate(model, PROMPT, GenerationConfig(max_new_tokens=12)).token_ids
    for seed in (1, 2):
        config = GenerationConfig(max_new_tokens=12, temperature=0.0, top_k=5, seed=seed)
        assert generate(model, PROMPT, config).token_ids == greedy
    top1 = GenerationConfig(max_new_tokens=12, temperature=1.5, top_k=1, seed=9)
    assert generate(model, PROMPT, top1).token_ids == greedy


def test_sampler_truncation_and_penalty():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    probs = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0)).probs(logits)
    assert probs[2:].sum() == 0 and probs[:2].sum() == pytest.approx(1)
    nucleus = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0)).probs(logits)
    assert (nucleus > 0).tolist() == [True, True, False, False, False]
    penalized = Sampler(SamplingConfig(repetition_penalty=2.0)).penalize(logits, [0, 3, 0])
    assert penalized.tolist() == [1.0, 1.0, 0.5, -2.0, -3.0]
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0).validate()


def test_repetition_penalty_is_exact_under_speculation():
    model = tiny_model("augmented")
    base = dict(max_new_tokens=16, repetition_penalty=1.3)
    plain = generate(model, PROMPT, GenerationConfig(**base)).token_ids
    draft = GenerationConfig(**base, speculative="draft", gamma=3)
    assert generate(model, PROMPT, draft, draft=model).token_ids == plain
    medusa = GenerationConfig(**base, speculative="medusa", tree="tree-16")
    assert generate(model, PROMPT, medusa, heads=MedusaHeads.from_model(model)).token_ids == plain


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batch_equals_one_by_one(temperature):
    model = tiny_model("hybrid")
    prompts = [[3, 4, 5], [9, 8], [1, 2, 6], [5], [7, 7, 7, 7]]
    config = GenerationConfig(max_new_tokens=10, temperature=temperature, seed=5)
    config.stop_token_ids = [prompts[0][0]]
    batch = generate_batch(model, prompts, config)
    for prompt, result in zip(prompts, batch, strict=True):
        alone = generate(model, prompt, config)
        assert result.token_ids == alone.token_ids
        assert result.finish_reason == alone.finish_reason
        assert result.forward_passes == alone.forward_passes


def test_streaming_text_deltas():
    model = text_model()
    config = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=0)
    deltas: list[str] = []
    result = generate(model, "Hello", config, on_text=deltas.append)
    assert "".join(deltas) == result.text
    assert "".join(stream(model, "Hello", config)) == result.text
    assert result.text == model.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_text_stream_multibyte_and_stop_strings():
    tokenizer = byte_tokenizer()
    text = "héllo ✓ wörld, done"
    ids = tokenizer.encode(text)
    stream_ = TextStream(tokenizer)
    deltas = [stream_.push(i) for i in ids] + [stream_.finish()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    stopper = TextStream(tokenizer, stop=["wörld"])
    deltas = []
    for i in ids:
        deltas.append(stopper.push(i))
        if stopper.stopped:
            break
    assert "".join(deltas) + stopper.finish() == "héllo ✓ "
    assert stopper.text == "héllo ✓ "


def test_stop_string_and_eos():
    model = text_model()
    config = GenerationConfig(max_new_tokens=30, temperature=1.0, seed=1)
    free = generate(model, "Hi", config)
    stop = free.text[6:9]
    cut = free.text.index(stop)
    stopped = generate(model, "Hi", GenerationConfig(**{**config.to_dict(), "stop": [stop]}))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    eos = free.token_ids[5]
    ended = generate(model, "Hi", GenerationConfig(**{**config.to_dict(), "stop_token_ids": [eos]}))
    assert ended.finish_reason == "eos"
    assert ended.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]


def test_chat_prompt():
    tokenizer = byte_tokenizer()
    ids = encode_prompt(tokenizer, "hi", chat=True)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    result = generate(text_model(), "hi", GenerationConfig(max_new_tokens=3, chat=True))
    assert result.prompt_ids == ids


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        ("", {}, "prompt is empty"),
        ([], {}, "prompt is empty"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ("hi", {"acceptance": "best"}, "unknown acceptance rule"),
        ("hi", {"speculative": "medusa", "tree": "tree-5"}, "unknown tree 'tree-5'"),
        ("hi", {"speculative": "medusa"}, "has none"),
        ("hi", {"speculative": "eagle"}, "speculative='eagle'"),
        ("hi", {"speculative": "draft"}, "needs a draft model"),
    ],
)
def test_bad_inputs(prompt, options, message):
    with pytest.raises(ValueError, match=message):
        generate(text_model(), prompt, GenerationConfig(**options))


def test_draft_with_another_vocabulary():
    config = GenerationConfig(max_new_tokens=4, speculative="draft", gamma=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(text_model(), "hi", config, draft=tiny_model("softmax"))


def test_text_prompt_needs_a_tokenizer():
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(tiny_model("softmax"), "hi", GenerationConfig(max_new_tokens=2))
