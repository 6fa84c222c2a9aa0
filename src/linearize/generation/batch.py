"""Many prompts at once, exactly as if each were generated alone.

The model state has one position for the whole batch (no padding, no per-row offsets), so prompts
of different lengths cannot share a forward pass without changing what some row attends to.
:func:`generate_batch` therefore buckets prompts by token length and decodes each bucket as one
batch (plain decoding), every row with its own sampler seeded like a batch-1 call, its own stop
conditions; rows that finish early keep being fed until the bucket ends, their extra tokens
dropped. Speculative decoding accepts a different path per row while ``commit`` takes one path
for the batch, so speculative requests run one prompt after another. Either way each result is
the batch-1 result (mathematically; float32 matmuls of different batch shapes may round
differently, as in any batched inference).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from linearize.generation.config import GenerationConfig
from linearize.generation.decode import (
    GenerationResult,
    generate,
    stop_token_ids,
)
from linearize.generation.sampling import Sampler
from linearize.generation.streaming import TextStream, check_context, encode_prompt
from linearize.models.decoder import Decoder


class _Row:
    """One sequence of a bucket: its sampler, history, output and stop state."""

    def __init__(self, model: Decoder, config: GenerationConfig, prompt: list[int]) -> None:
        self.sampler = Sampler(config.sampling(), device=model.device)
        self.history = list(prompt)
        self.prompt = prompt
        self.tokens: list[int] = []
        self.stream = TextStream(model.tokenizer, config.stop) if model.tokenizer else None
        self.reason: str | None = None
        self.passes = 0

    def take(self, logits: torch.Tensor, stops: set[int], limit: int) -> int:
        token = self.sampler.sample(self.sampler.probs(logits, self.history))
        if self.reason is None:
            self.tokens.append(token)
            if self.stream is not None:
                self.stream.push(token)
            if token in stops:
                self.reason = "eos"
            elif self.stream is not None and self.stream.stopped:
                self.reason = "stop"
            elif len(self.tokens) >= limit:
                self.reason = "length"
        self.history.append(token)
        return token


@torch.no_grad()
def _bucket(model: Decoder, config: GenerationConfig, prompts: list[list[int]]):
    rows = [_Row(model, config, p) for p in prompts]
    stops = stop_token_ids(model, config)
    start = time.perf_counter()
    # 1. prefill the bucket
    ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
    last, state = model.prefill(ids)
    logits = model.lm_head(last)
    roots = [row.take(logits[i], stops, config.max_new_tokens) for i, row in enumerate(rows)]
    prefill_s = time.perf_counter() - start
    # 2. decode until every row has finished
    while any(row.reason is None for row in rows):
        ids = torch.tensor(roots, dtype=torch.long, device=model.device)[:, None]
        logits, state = model(ids, state=state)
        for row in rows:
            row.passes += row.reason is None
        roots = [
            row.take(logits[i, -1], stops, config.max_new_tokens) for i, row in enumerate(rows)
        ]
    seconds = time.perf_counter() - start
    return [_result(row, seconds, prefill_s) for row in rows]


def _result(row: _Row, seconds: float, prefill_s: float) -> GenerationResult:
    stream = row.stream
    if stream is not None:
        stream.finish()
    return GenerationResult(
        token_ids=row.tokens,
        text=None if stream is None else stream.text,
        prompt_ids=row.prompt,
        finish_reason=row.reason or "length",
        forward_passes=row.passes,
        draft_passes=0,
        mean_accepted=1.0 if row.passes else 0.0,
        seconds=seconds,
        prefill_s=prefill_s,
        calibration_s=0.0,
    )


def generate_batch(
    model: Decoder,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig | None = None,
    **options,
) -> list[GenerationResult]:
    """One result per prompt, in order, each identical to a batch-1 :func:`generate` call.

    ``options`` (heads, draft, calibration) go to :func:`generate` for speculative requests.
    """
    config = (config or GenerationConfig()).validate()
    if not prompts:
        raise ValueError("no prompts given")
    if config.speculative != "none":
        return [generate(model, p, config, **options) for p in prompts]
    if config.stop and model.tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model has none")
    encoded = [encode_prompt(model.tokenizer, p, chat=config.chat) for p in prompts]
    config = check_context(model, max(len(ids) for ids in encoded), config)
    buckets: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        buckets.setdefault(len(ids), []).append(i)
    results: list[GenerationResult | None] = [None] * len(prompts)
    for indices in buckets.values():
        bucket = _bucket(model, config, [encoded[i] for i in indices])
        for i, result in zip(indices, bucket, strict=True):
            results[i] = result
    return results
