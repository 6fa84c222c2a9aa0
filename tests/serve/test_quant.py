"""Serving a quantized model: on the engine (the default for int8 / int4: rows stepped together
in groups, each row as ``generate`` on the engine runs it alone), or on the PyTorch reference
path, batched."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from linearize.engine import build_engine
from linearize.generation import GenerationConfig, generate
from linearize.models.quantize import quantize, quantized_numel, weight_bytes
from linearize.serve import ServeConfig, build_app, serve_in_thread
from tests.generation.conftest import text_model
from tests.serve.conftest import KEY, LIMITS, serving_model


@pytest.mark.parametrize("quant", ["int4", "bf16"])
def test_quantized_model_serves_what_generate_gives(quant):
    # float64 like the other serving tests: batched rows then match generate exactly.
    model = quantize(serving_model(), quant)
    want = generate(model, "It is a truth", GenerationConfig(max_new_tokens=12))
    config = ServeConfig(model="q4", api_key=KEY, quant=quant, engine="torch", **LIMITS)
    with (
        serve_in_thread(build_app(model, config, None)) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client,
    ):
        out = client.completions.create(
            model="q4", prompt="It is a truth", max_tokens=12, temperature=0
        )
        auth = {"Authorization": f"Bearer {KEY}"}
        health = httpx.get(f"{url}/health", headers=auth).json()
    assert out.choices[0].text == want.text
    # What the model holds: its codes (or bf16 weights) and the float copies kept of them.
    assert health["model_bytes"] == weight_bytes(model) > quantized_numel(model) // 2
    # The batched rows multiply by weights dequantized once, not on every step.
    dense = [m.dense for m in model.modules() if hasattr(m, "dense")]
    assert dense if quant == "int4" else not dense
    assert all(d is not None for d in dense)


def test_quantized_model_serves_on_the_engine_what_generate_gives_on_it():
    """Concurrent requests on one engine (rows stepped together, joining and leaving) give what
    ``generate`` gives for each alone on an engine of the same model."""
    model = quantize(text_model("hybrid").float().eval(), "int4")
    prompts = ["It is a truth", "Emma Woodhouse, handsome", "The family of Dashwood had long"]
    engine = build_engine("onnx", model, max_context=256)
    config = GenerationConfig(max_new_tokens=24)
    want = [generate(model, p, config, engine=engine).text for p in prompts]
    # One prompt chunk, as generate prefills; the default engine for an int4 model is onnx.
    limits = {**LIMITS, "prefill_chunk": 512}
    app = build_app(model, ServeConfig(model="q4", api_key=KEY, **limits), None)
    served = app.state.scheduler.engine
    # The rows' graph is ready before the first request (loaded at start).
    assert served is not None and (served.step_accuracy, True) in served.steps
    with (
        serve_in_thread(app) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client,
    ):

        def complete(prompt: str):
            out = client.completions.create(model="q4", prompt=prompt, max_tokens=24, temperature=0)
            return out.choices[0]

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(complete, prompts))
        stats = app.state.scheduler.stats()
        # A follow-up starting with a finished conversation prefills only what is new: the
        # engine's ring state went back to PyTorch, into the prefix cache.
        history = [*model.tokenizer(prompts[0])["input_ids"], *got[0].token_ids]
        follow = client.completions.create(
            model="q4", prompt=[*history, 5, 6], max_tokens=2, temperature=0
        )
    assert [c.text for c in got] == want
    assert stats["row_steps"] > stats["steps"]  # rows stepped in the same scheduler steps
    cached = follow.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(history) - 1, (cached, len(history))


def test_bad_engine_is_refused():
    with pytest.raises(ValueError, match="engine='fast'; allowed"):
        ServeConfig(model="q4", engine="fast").validate()


@pytest.mark.parametrize("kv_type", [None, "float32"])
def test_serve_kv_type_reaches_the_engine(kv_type):
    """``--kv-type`` builds the served engine's rings (default for int4 weights: float16), and
    ``/health`` names them."""
    model = quantize(text_model("hybrid").float().eval(), "int4")
    config = ServeConfig(model="q4", api_key=KEY, kv_type=kv_type, **LIMITS)
    app = build_app(model, config, None)
    assert app.state.scheduler.engine.kv_type == (kv_type or "float16")
    with serve_in_thread(app) as url:
        health = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert (health["engine"], health["kv_type"]) == ("onnx", kv_type or "float16")


def test_bad_kv_type_is_refused():
    with pytest.raises(ValueError, match="kv_type.*'int4'.*'float16'"):
        ServeConfig(model="q4", kv_type="int4").validate()
