"""Perplexity through the onnx engine equals the PyTorch reference's on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from linearize.engine.onnx import OnnxEngine
from linearize.eval.engine_perplexity import engine_perplexity
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


def test_engine_perplexity_bad_input(tmp_path):
    engine = OnnxEngine(engine_model("augmented"), max_context=16, cache=tmp_path)
    with pytest.raises(ValueError, match="1-D"):
        engine_perplexity(engine, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens 99 asked"):
        engine_perplexity(engine, torch.zeros(8, dtype=torch.long), PerplexityConfig(tokens=99))
