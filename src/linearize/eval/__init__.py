"""Evaluation: perplexity on a corpus (its protocol is train/perplexity.py), the paper's study."""

from linearize.train.perplexity import (
    PerplexityConfig,
    PerplexityResult,
    perplexity,
    window_spans,
)

__all__ = ["PerplexityConfig", "PerplexityResult", "perplexity", "window_spans"]
