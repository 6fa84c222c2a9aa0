"""The pieces behind the server: the prefix cache's bounds, the queue's back-pressure."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from linearize.generation import GenerationConfig
from linearize.models.state import copy_state
from linearize.serve import Job, PrefixCache, QueueFull, Scheduler
from tests.generation.conftest import tiny_model


def _entry_bytes(state) -> int:
    cache = PrefixCache(10**9)
    cache.put(list(range(state.pos)), state)
    return cache.nbytes


def test_prefix_cache_is_lru_bounded_by_bytes():
    model = tiny_model("augmented")
    # Past the tiny model's window: its buffers are full, the entries all the same size.
    states = {n: model(torch.arange(1, n + 1)[None])[1] for n in (20, 21, 22)}
    size = _entry_bytes(states[20])
    assert _entry_bytes(states[22]) == size
    cache = PrefixCache(max_bytes=2 * size)
    for n in (20, 21):
        cache.put(list(range(1, n + 1)), states[n])
    state, n = cache.lookup([*range(1, 22), 99])
    assert n == 21 and state is not states[21] and state.pos == 21
    cache.put(list(range(1, 23)), states[22])  # evicts the 20 tokens, the least recently used
    assert cache.nbytes <= 2 * size and len(cache) == 2
    assert cache.lookup([*range(1, 21), 7])[1] == 0
    assert cache.lookup([*range(1, 23), 5])[1] == 22
    # A whole prompt is never its own prefix: one token must remain to predict from.
    assert cache.lookup(list(range(1, 23)))[1] == 21


@pytest.mark.parametrize("kind", ["softmax", "wide", "wide_retain"])
def test_prefix_cache_keeps_what_a_state_uses(kind):
    """A short prompt's entry holds its kept tokens, not the whole window (a window of 60
    here) nor a KV cache's empty capacity; what a lookup returns has the state's size and
    decodes exactly as the state it was made from."""
    from tests.engine.conftest import engine_model

    model = engine_model(kind).double()
    prompt = torch.arange(1, 8)[None]
    with torch.no_grad():
        _, state = model(prompt)
    cache = PrefixCache(10**9)
    cache.put(prompt[0].tolist(), state)
    if kind == "softmax":  # a KV cache counts its filled part (KVCache.nbytes)
        assert cache.nbytes == state.nbytes()
    else:
        assert cache.nbytes < state.nbytes() / 4
    restored, n = cache.lookup([*prompt[0].tolist(), 9])
    assert n == 7 and restored.nbytes() == state.nbytes()
    _assert_same_state(state, restored)  # slot for slot
    original = copy_state(state)
    token = torch.tensor([[9]])
    with torch.no_grad():
        for _ in range(3):  # (a step writes into its state's buffers)
            want, state = model(token, state=state)
            got, restored = model(token, state=restored)
            assert torch.equal(want, got)
            token = want[:, -1:].argmax(-1)
    _assert_same_state(original, cache.lookup([*prompt[0].tolist(), 9])[0])  # the entry intact


def _assert_same_state(want, got) -> None:
    for a, b in zip(want.layers, got.layers, strict=True):
        for field in dataclasses.fields(a.attn):
            x, y = getattr(a.attn, field.name), getattr(b.attn, field.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field.name


def test_queue_full():
    scheduler = Scheduler(tiny_model("elu"), PrefixCache(0), max_sessions=1, max_queue=1)
    jobs = [Job(str(i), [1, 2], GenerationConfig(), lambda e: None) for i in range(3)]
    scheduler.submit(jobs[0])
    scheduler.submit(jobs[1])
    with pytest.raises(QueueFull):
        scheduler.submit(jobs[2])
    jobs[0].cancel()  # a cancelled request gives its place back
    scheduler.submit(jobs[2])


def test_speculative_and_plain_rows_together():
    """A row decoding speculatively (lookup, γ=2: it always speculates) beside plain rows:
    each yields what `generate` yields alone."""
    import threading

    from linearize.generation import generate

    model = tiny_model("hybrid")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # repeats, so lookup finds candidates
    configs = [
        GenerationConfig(max_new_tokens=12, speculative="lookup", gamma=2),
        GenerationConfig(max_new_tokens=9),
        GenerationConfig(max_new_tokens=15, temperature=0.8, seed=3),
    ]
    scheduler = Scheduler(model, PrefixCache(10**8), max_sessions=3, max_queue=0)
    done = threading.Semaphore(0)
    got: list[list[int]] = [[] for _ in configs]

    def emit(i):
        def receive(event):
            got[i].extend(event.token_ids)
            if event.kind != "delta":
                done.release()

        return receive

    scheduler.start()
    try:
        for i, config in enumerate(configs):
            scheduler.submit(Job(str(i), prompt[: 10 - i], config, emit(i)))
        for _ in configs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    for i, config in enumerate(configs):
        assert got[i] == generate(model, prompt[: 10 - i], config).token_ids


def test_prompts_arriving_together_are_prefilled_together():
    """Four equal-length prompts queued at once share one prefill pass, then decode as rows
    joining the batch (one leaves early): each yields what `generate` yields alone."""
    import threading

    from linearize.generation import generate

    model = tiny_model("hybrid")
    prompts = [[3 + i, 9, 4 + 2 * i, 7, 1 + i] for i in range(4)] + [[5, 6]]
    configs = [GenerationConfig(max_new_tokens=n) for n in (6, 2, 9, 7, 5)]
    scheduler = Scheduler(model, PrefixCache(10**8), max_sessions=5, max_queue=0)
    done = threading.Semaphore(0)
    got: list[list[int]] = [[] for _ in configs]

    def emit(i):
        def receive(event):
            got[i].extend(event.token_ids)
            if event.kind != "delta":
                done.release()

        return receive

    for i, (prompt, config) in enumerate(zip(prompts, configs, strict=True)):
        scheduler.submit(Job(str(i), prompt, config, emit(i)))
    scheduler.start()
    try:
        for _ in configs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert scheduler.stats()["prefilled_together"] == 4
    for i, (prompt, config) in enumerate(zip(prompts, configs, strict=True)):
        assert got[i] == generate(model, prompt, config).token_ids
