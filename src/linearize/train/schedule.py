"""The learning-rate schedule of every training loop (the trainer's stages, Medusa heads)."""

import math


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(self.total - self.warmup, 1)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.min_ratio + (1 - self.min_ratio) * cosine
