"""The pieces behind the server: the prefix cache's bounds, the queue's back-pressure."""

from __future__ import annotations

import pytest
import torch

from linearize.generation import GenerationConfig
from linearize.serve import Job, PrefixCache, QueueFull, Scheduler
from tests.generation.conftest import tiny_model


def test_prefix_cache_is_lru_bounded_by_bytes():
    model = tiny_model("augmented")
    states = {n: model(torch.arange(1, n + 1)[None])[1] for n in (2, 3, 4)}
    size = states[2].nbytes()  # a linear state: the same size after 2, 3 or 4 tokens
    assert states[4].nbytes() == size
    cache = PrefixCache(max_bytes=2 * size)
    for n in (2, 3):
        cache.put(list(range(1, n + 1)), states[n])
    state, n = cache.lookup([1, 2, 3, 9])
    assert n == 3 and state is not states[3] and state.pos == 3
    cache.put([1, 2, 3, 4], states[4])  # evicts [1, 2], the least recently used
    assert cache.nbytes <= 2 * size and len(cache) == 2
    assert cache.lookup([1, 2, 7])[1] == 0
    assert cache.lookup([1, 2, 3, 4, 5])[1] == 4
    # A whole prompt is never its own prefix: one token must remain to predict from.
    assert cache.lookup([1, 2, 3, 4])[1] == 3


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
