"""Evaluation and benchmarks: perplexity, the paper's study, decode/prefill speed and memory."""

from linearize.train.perplexity import (
    PerplexityConfig,
    PerplexityResult,
    perplexity,
    window_spans,
)

__all__ = ["PerplexityConfig", "PerplexityResult", "perplexity", "window_spans"]
