"""Serving a quantized model: the reference path on the quantized weights, as generate runs it."""

from __future__ import annotations

import openai
import pytest

from linearize.generation import GenerationConfig, generate
from linearize.models.quantize import quantize
from linearize.serve import ServeConfig, build_app, serve_in_thread
from tests.serve.conftest import KEY, LIMITS, serving_model


@pytest.mark.parametrize("quant", ["int4", "bf16"])
def test_quantized_model_serves_what_generate_gives(quant):
    # float64 like the other serving tests: batched rows then match generate exactly.
    model = quantize(serving_model(), quant)
    want = generate(model, "It is a truth", GenerationConfig(max_new_tokens=12))
    config = ServeConfig(model="q4", api_key=KEY, quant=quant, **LIMITS)
    with (
        serve_in_thread(build_app(model, config, None)) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client,
    ):
        out = client.completions.create(
            model="q4", prompt="It is a truth", max_tokens=12, temperature=0
        )
    assert out.choices[0].text == want.text
    # The batched rows multiply by weights dequantized once, not on every step.
    dense = [m.dense for m in model.modules() if hasattr(m, "dense")]
    assert dense if quant == "int4" else not dense
    assert all(d is not None for d in dense)
