"""Perplexity through the onnx engine equals the PyTorch reference's on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from linearize.engine.onnx import OnnxEngine
from linearize.eval.engine_perplexity import engine_perplexity, engine_stream_perplexity
from linearize.eval.long_context import stream_perplexity
from linearize.train.perplexity import PerplexityConfig, perplexity
from tests.engine.conftest import engine_model

pytest.importorskip("onnxruntime")

EXACT = "fp32"


@pytest.mark.parametrize("kind", ["augmented", "softmax"])
@pytest.mark.parametrize("stream", [False, True])
def test_engine_perplexity_matches_reference(kind, stream, tmp_path):
    torch.manual_seed(0)
    model = engine_model(kind)
    tokens = torch.randint(0, 128, (150,))
    # Windows of 70 with stride 50 overlap, and 70 > 64 tokens crosses one engine chain.
    config = PerplexityConfig(window=70, stride=None if stream else 50, stream=stream)
    engine = OnnxEngine(model, max_context=160, threads=1, cache=tmp_path, accuracy=EXACT)
    ours = engine_perplexity(engine, tokens, config)
    reference = perplexity(model, tokens, config)
    assert ours.tokens == reference.tokens == 149
    assert ours.form == "engine"
    assert math.isclose(ours.nll, reference.nll, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["augmented", "softmax", "retain"])
def test_engine_perplexity_by_position_matches_reference(kind, tmp_path):
    """Bucket by bucket, through chains of the engine (a linear model on one carried state
    across 3 chains; a softmax model in windows of its positions)."""
    torch.manual_seed(0)
    model = engine_model(kind)
    model.config.max_position_embeddings = 100  # the softmax model: two windows
    tokens = torch.randint(0, 128, (150,))
    edges = (0, 16, 70, 120)
    engine = OnnxEngine(model, max_context=160, threads=1, cache=tmp_path, accuracy=EXACT)
    reads = []
    ours = engine_stream_perplexity(engine, tokens, edges, lambda *a: reads.append(a))
    reference = stream_perplexity(model, tokens, edges, segment=40)
    assert ours.scored_as == reference.scored_as
    assert ours.scored_as == ("windows of 100" if kind == "softmax" else "stream")
    assert ours.tokens == reference.tokens == (148 if kind == "softmax" else 149)
    assert [(b.start, b.end, b.tokens) for b in ours.buckets] == [
        (b.start, b.end, b.tokens) for b in reference.buckets
    ]
    for a, b in zip(ours.buckets, reference.buckets, strict=True):
        assert math.isclose(a.ppl, b.ppl, rel_tol=1e-5)
    assert math.isclose(ours.nll, reference.nll, rel_tol=1e-5)
    assert reads[-1] == (149, 149)
    with pytest.raises(ValueError, match="shorter than the first bucket"):
        engine_stream_perplexity(engine, tokens[:10], edges)
    small = OnnxEngine(model, max_context=64, threads=1, cache=tmp_path, accuracy=EXACT)
    if kind == "softmax":
        with pytest.raises(ValueError, match="windows of 100 tokens; this engine's max_context"):
            engine_stream_perplexity(small, tokens, edges)


def test_engine_perplexity_bad_input(tmp_path):
    engine = OnnxEngine(engine_model("augmented"), max_context=16, cache=tmp_path)
    with pytest.raises(ValueError, match="1-D"):
        engine_perplexity(engine, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens 99 asked"):
        engine_perplexity(engine, torch.zeros(8, dtype=torch.long), PerplexityConfig(tokens=99))
