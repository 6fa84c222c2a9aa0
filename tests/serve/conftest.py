"""A real server on 127.0.0.1 (a free port) around a tiny float64 hybrid model (a softmax
layer with its KV cache, an augmented linear layer) with the byte tokenizer and Medusa heads."""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch

from linearize.generation.medusa import MedusaConfig, MedusaHeads
from linearize.serve import ServeConfig, build_app, serve_in_thread
from tests.generation.conftest import text_model

MODEL = "tiny"
KEY = "test-key"
# Prompts are prefilled 5 tokens per step: most of them in several chunks.
LIMITS = {
    "max_prompt_tokens": 200,
    "max_tokens": 4096,
    "max_sessions": 4,
    "max_queue": 32,
    "prefill_chunk": 5,
}


def serving_model():
    return text_model("hybrid").double().eval()


@pytest.fixture(scope="package")
def model():
    return serving_model()


@pytest.fixture(scope="package")
def heads(model):
    torch.manual_seed(1)
    config = MedusaConfig(num_heads=2, hidden_size=64, vocab_size=model.config.vocab_size)
    return MedusaHeads(config).double()


@pytest.fixture(scope="package")
def server(model, heads):
    """The base URL of a running server; the model it serves is a copy of ``model``."""
    config = ServeConfig(model=MODEL, api_key=KEY, **LIMITS)
    with serve_in_thread(build_app(copy.deepcopy(model), config, copy.deepcopy(heads))) as url:
        yield url


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c
