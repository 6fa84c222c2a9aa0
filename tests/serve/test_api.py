"""The OpenAI API of ``linearize serve``: results equal ``generate``, streamed or not, alone or
with 15 other clients; the prefix cache changes nothing; bad input gets a 4xx error object."""

from __future__ import annotations

import copy
import json
import threading
import time

import httpx
import pytest

from linearize.generation import GenerationConfig, generate
from linearize.generation.streaming import encode_chat
from linearize.serve import ServeConfig, build_app, serve_in_thread
from tests.serve.conftest import KEY, MODEL

PROMPTS = ["It is a truth", "Hello there, how", "x", "Emma Woodhouse, handsome, clever"]


def expected(model, prompt, max_tokens, heads=None, **options):
    config = GenerationConfig(max_new_tokens=max_tokens, **options)
    return generate(model, prompt, config, heads=heads)


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["engine"] == "torch"  # (a float model: auto keeps PyTorch)


@pytest.mark.parametrize("speculative", ["none", "lookup", "medusa"])
def test_completion_equals_generate(client, model, heads, speculative):
    want = expected(model, PROMPTS[0], 20)
    # ... which is what `generate` gives with the same speculation (lossless).
    lossless = expected(model, PROMPTS[0], 20, heads, speculative=speculative)
    assert lossless.token_ids == want.token_ids
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=20,
        temperature=0,
        extra_body={"speculative": speculative},
    )
    choice = out.choices[0]
    assert choice.token_ids == want.token_ids
    assert choice.text == want.text
    assert out.usage.completion_tokens == len(want.token_ids)
    assert out.usage.prompt_tokens == len(want.prompt_ids)


def test_stream_equals_generate(client, model):
    want = expected(model, PROMPTS[1], 24)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[1],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    ids = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    assert ids == want.token_ids
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_sampling_with_seed_equals_generate(client, model):
    options = dict(temperature=0.9, top_p=0.8, seed=7)
    want = expected(model, PROMPTS[3], 16, **options)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, **options)
    assert out.choices[0].token_ids == want.token_ids


def test_chat_multi_turn(client, model):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    prompt = encode_chat(model.tokenizer, messages)
    want = expected(model, prompt, 12)
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == len(prompt)
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == want.text


def test_stop_string(client, model):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    text = free.choices[0].text
    stop = text[5:7]
    if not stop.strip() or "\ufffd" in stop:
        pytest.skip("the tiny model's text has no usable stop string here")
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop]
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.find(stop)]


def test_concurrent_streams_equal_alone(client, http, model):
    """16 streaming clients on 4 rows (the rest queue): each gets its own batch-1 text."""
    jobs = [(PROMPTS[i % 4] + " " * (i // 4), 8 + 3 * i) for i in range(16)]
    wants = [expected(model, p, n).token_ids for p, n in jobs]
    got: list[list[int] | None] = [None] * len(jobs)

    def run(i: int) -> None:
        prompt, n = jobs[i]
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        got[i] = [t for c in stream if c.choices for t in c.choices[0].token_ids]

    before = http.get("/health").json()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == wants
    after = http.get("/health").json()
    # Rows were decoded together: more than one row per batched step on average.
    steps = after["steps"] - before["steps"]
    assert after["row_steps"] - before["row_steps"] > 1.5 * steps


def test_prefix_cache_changes_nothing(client, http, model):
    system = {"role": "system", "content": "You answer every question about Jane Austen."}
    first = [system, {"role": "user", "content": "Who is Emma?"}]
    second = [system, {"role": "user", "content": "Who is Mr Knightley?"}]
    before = http.get("/health").json()["prefix_cache"]["hits"]
    client.chat.completions.create(model=MODEL, messages=first, max_tokens=4, temperature=0)
    out = client.chat.completions.create(model=MODEL, messages=second, max_tokens=16, temperature=0)
    assert http.get("/health").json()["prefix_cache"]["hits"] > before
    # The system message's state came from the cache: only the rest was prefilled.
    prompt = encode_chat(model.tokenizer, second)
    system_ids = encode_chat(model.tokenizer, [system], add_generation_prompt=False)
    assert out.usage.prompt_tokens_details.cached_tokens == len(system_ids)
    assert out.choices[0].token_ids == expected(model, prompt, 16).token_ids


BAD = [
    ("malformed json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400),
    ("unknown model", "/v1/completions", {"model": "gpt-5", "prompt": "Hi"}, 404),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400),
    (
        "negative max_tokens",
        "/v1/completions",
        {"model": MODEL, "prompt": "a", "max_tokens": -1},
        400,
    ),
    (
        "huge max_tokens",
        "/v1/completions",
        {"model": MODEL, "prompt": "a", "max_tokens": 10**9},
        400,
    ),
    (
        "unknown role",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
    ),
    ("prompt over the limit", "/v1/completions", {"model": MODEL, "prompt": "a" * 500}, 400),
    ("n > 1", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 2}, 400),
    ("bad temperature", "/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -1}, 400),
    (
        "unknown speculative",
        "/v1/completions",
        {"model": MODEL, "prompt": "a", "speculative": "x"},
        400,
    ),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_error_object(http, client, name, path, body, status):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    # ... and the server keeps serving.
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2).choices


def test_wrong_api_key(server, http, client):
    for headers in ({"Authorization": "Bearer nope"}, {"Authorization": ""}):
        response = http.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.models.list().data


def _idle(http, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = http.get("/health").json()
        if health["active"] == 0 and health["queued"] == 0 or time.monotonic() > deadline:
            return health


def test_disconnect_frees_the_row(http):
    cancelled = http.get("/health").json()["cancelled"]
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4000, "stream": True}
    body["ignore_eos"] = True
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
    # The client hung up after one chunk: the request is cancelled and its row leaves, its
    # state with it.
    health = _idle(http)
    assert health["active"] == 0 and health["queued"] == 0 and health["state_bytes"] == 0
    assert health["cancelled"] == cancelled + 1


def test_a_non_streaming_client_that_leaves_is_cancelled(server, http):
    cancelled = http.get("/health").json()["cancelled"]
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4000, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while tokens keep coming
        httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=1.0)
    health = _idle(http)
    assert health["active"] == 0 and health["queued"] == 0 and health["state_bytes"] == 0
    assert health["cancelled"] == cancelled + 1


def test_busy_server_answers_429(model):
    config = ServeConfig(model=MODEL, max_sessions=1, max_queue=0, max_tokens=4000)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4000, "stream": True}
    body["ignore_eos"] = True  # 4000 tokens: busy long enough
    with (
        serve_in_thread(build_app(copy.deepcopy(model), config)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        with http.stream("POST", "/v1/completions", json=body) as busy:
            # Hold the line iterator: dropping it would close the connection (a disconnect).
            lines = busy.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            assert http.get("/health").json()["active"] == 1
            response = http.post("/v1/completions", json={**body, "stream": False})
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert _idle(http)["active"] == 0
        ok = http.post("/v1/completions", json={**body, "max_tokens": 2, "stream": False})
        assert ok.status_code == 200


def test_medusa_without_heads_is_a_bad_request(model):
    config = ServeConfig(model=MODEL, max_tokens=8)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4, "speculative": "medusa"}
    with (
        serve_in_thread(build_app(copy.deepcopy(model), config)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert "no Medusa heads" in error["message"] and "load_heads" not in error["message"]
        assert (
            http.post("/v1/completions", json={**body, "speculative": "lookup"}).status_code == 200
        )
