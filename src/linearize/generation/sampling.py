"""Turning logits into a next-token distribution: repetition penalty, temperature, top-k, top-p.

Every decoding mode (plain, Medusa, draft, lookup) calls the same :class:`Sampler`, so the
distribution a speculative step accepts from is exactly the one plain decoding samples from.
Temperature 0 means greedy: the distribution is one-hot on the argmax and no random number is
drawn, so the seed does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from linearize.config import Config, option


@dataclass
class SamplingConfig(Config):
    """How the next token is chosen from the model's logits."""

    temperature: float = option("0 = greedy; otherwise logits are divided by it", 0.0)
    top_k: int = option("keep the k most likely tokens (0 = all)", 0)
    top_p: float = option("keep the smallest set of tokens whose mass reaches p (1 = all)", 1.0)
    repetition_penalty: float = option(
        "divide positive (multiply negative) logits of tokens already seen by it (1 = off)", 1.0
    )
    seed: int | None = option("seed of the sampling generator (ignored when greedy)", None)

    def validate(self) -> SamplingConfig:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """``probs(logits, history)``, ``argmax(logits, history)`` and ``sample(probs)``.

    ``history`` is every token the prediction conditions on (prompt included, as in
    transformers' repetition penalty); it only matters when ``repetition_penalty != 1``.
    """

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu") -> None:
        self.config = config.validate()
        self.generator = None
        if not config.greedy:
            self.generator = torch.Generator(device=device)
            if config.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(config.seed)

    @property
    def greedy(self) -> bool:
        return self.config.greedy

    @property
    def uses_history(self) -> bool:
        """Whether the distribution depends on the history (a repetition penalty)."""
        return self.config.repetition_penalty != 1

    def penalize(self, logits: Tensor, history: Sequence[int] | Tensor) -> Tensor:
        """``logits: [V]`` with the repetition penalty applied to the tokens of ``history``."""
        penalty = self.config.repetition_penalty
        if penalty == 1 or len(history) == 0:
            return logits
        seen = torch.as_tensor(history, dtype=torch.long, device=logits.device).unique()
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        return logits

    def argmax(self, logits: Tensor, history: Sequence[int] | Tensor = ()) -> int:
        """The greedy token (ties: lowest id, as ``torch.argmax``)."""
        return int(self.penalize(logits, history).argmax())

    def probs(self, logits: Tensor, history: Sequence[int] | Tensor = ()) -> Tensor:
        """The next-token distribution ``[V]`` (float32 or wider; one-hot when greedy)."""
        logits = self.penalize(logits, history)
        if self.greedy:
            out = torch.zeros(logits.shape, dtype=_wide(logits.dtype), device=logits.device)
            out[logits.argmax()] = 1
            return out
        logits = logits.to(_wide(logits.dtype)) / self.config.temperature
        return torch.softmax(_truncate(logits, self.config.top_k, self.config.top_p), dim=-1)

    def sample(self, probs: Tensor) -> int:
        """One token from ``probs: [V]`` (the argmax when greedy: no random number is drawn)."""
        if self.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """A uniform draw in [0, 1) from the same generator (for acceptance tests)."""
        if self.generator is None:
            raise RuntimeError("greedy decoding draws no random numbers")
        return float(torch.rand((), generator=self.generator, device=self.generator.device))


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _truncate(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask (to −inf) every token outside the top-k and outside the top-p nucleus."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        mass = torch.softmax(sorted_logits, -1).cumsum(-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop_sorted = (mass - torch.softmax(sorted_logits, -1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
