"""Perplexity: the protocol, its forms and its windows."""

from __future__ import annotations

import math

import pytest
import torch

from linearize import Decoder, linearize
from linearize.data import source_tokens
from linearize.train.perplexity import (
    EVAL_FORMS,
    PerplexityConfig,
    perplexity,
    window_spans,
)
from tests.eval.conftest import tiny_augmented, tiny_config


def _close(a: float, b: float, rtol: float = 1e-9) -> None:
    assert abs(a - b) <= rtol * abs(b), f"{a} vs {b} (relative error {abs(a - b) / abs(b):.3g})"


def _tokens(n: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("form", EVAL_FORMS)
def test_uniform_logits_give_the_vocabulary_size(form, stream):
    model = Decoder(tiny_config(tie_embeddings=False)).double().eval()
    torch.nn.init.zeros_(model.lm_head.weight)
    result = perplexity(model, _tokens(50), PerplexityConfig(window=16, form=form, stream=stream))
    _close(result.ppl, 128.0)
    _close(result.nll, math.log(128))
    # Non-overlapping windows score all but their first token; a stream all but the first.
    assert result.tokens == (49 if stream else 50 - 4)
    assert result.window == 16 and result.form == form and result.seconds >= 0


@pytest.mark.parametrize(
    ("n", "window", "stride"),
    [(2, 2, None), (10, 4, None), (64, 16, 16), (65, 16, 5), (30, 7, 3), (9, 9, 1)],
)
def test_every_target_is_scored_at_most_once(n, window, stride):
    spans = window_spans(n, window, stride)
    scored = [t for s in spans for t in range(s.score_from, s.end)]
    if stride is None or stride == window:
        starts = {s.start for s in spans}
        assert scored == [t for t in range(1, n) if t not in starts]
    else:
        assert scored == list(range(1, n))
    for s in spans:
        assert s.end - s.start <= window and s.start < s.score_from <= s.end


def test_strided_windows_agree_with_one_full_pass():
    # Two layers of a 8-token sliding window (no sinks) see 14 tokens back: with windows of 32
    # started every 16 tokens, every scored token keeps its whole receptive field.
    model = Decoder(tiny_config())
    linearize(model, {"name": "sliding_window", "size": 8, "sinks": 0})
    model = model.double().eval()
    tokens = _tokens(100)
    full = perplexity(model, tokens, PerplexityConfig(window=100, form="parallel"))
    strided = perplexity(model, tokens, PerplexityConfig(window=32, stride=16, form="parallel"))
    assert strided.tokens == full.tokens == 99
    _close(strided.nll, full.nll)
    # Non-overlapping windows lose context at every window start: a different number.
    cut = perplexity(model, tokens, PerplexityConfig(window=32, form="parallel"))
    assert cut.tokens == 96 and abs(cut.nll - full.nll) > 1e-6


def test_every_form_gives_the_same_perplexity():
    model = tiny_augmented()
    tokens = _tokens(90)
    results = [
        perplexity(model, tokens, PerplexityConfig(window=40, form=form)) for form in EVAL_FORMS
    ]
    for r in results[1:]:
        _close(r.nll, results[0].nll)
    assert len({r.tokens for r in results}) == 1


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_streaming_equals_one_parallel_pass(form):
    model = tiny_augmented()
    tokens = _tokens(70)
    full = perplexity(model, tokens, PerplexityConfig(window=70, form="parallel"))
    streamed = perplexity(model, tokens, PerplexityConfig(window=16, form=form, stream=True))
    assert streamed.tokens == full.tokens == 69
    _close(streamed.nll, full.nll)


def test_tokens_scores_only_a_prefix():
    model = tiny_augmented()
    tokens = _tokens(80)
    head = perplexity(model, tokens, PerplexityConfig(window=16, tokens=48))
    alone = perplexity(model, tokens[:48], PerplexityConfig(window=16))
    assert head.tokens == 45
    _close(head.nll, alone.nll)


def test_bad_inputs():
    model = tiny_augmented()
    with pytest.raises(ValueError, match="larger than the text"):
        perplexity(model, _tokens(20), PerplexityConfig(window=32))
    with pytest.raises(ValueError, match="the data has 20 tokens"):
        perplexity(model, _tokens(20), PerplexityConfig(window=8, tokens=30))
    for bad in (dict(window=1), dict(window=8, stride=9), dict(form="tree"), dict(tokens=1)):
        with pytest.raises(ValueError):
            PerplexityConfig(**bad).validate()
    with pytest.raises(ValueError, match=r"austen:eval.*mobydick"):
        source_tokens("no-such-corpus", None)
    with pytest.raises(ValueError, match="no tokenizer"):
        source_tokens("austen:eval", None)
