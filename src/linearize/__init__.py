"""linearize: turn pretrained LLMs into linear-attention LLMs, train them back, serve them fast."""

import logging

from linearize import hf  # noqa: F401  (registers our classes with transformers' Auto classes)
from linearize.layers import (
    Attention,
    AttentionConfig,
    AttentionState,
    attention_config,
    build_attention,
    list_attentions,
)
from linearize.models import Decoder, ModelConfig, ModelState, linearize, load
from linearize.ops.tree import Tree

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttentionConfig",
    "AttentionState",
    "Decoder",
    "ModelConfig",
    "ModelState",
    "Tree",
    "attention_config",
    "build_attention",
    "linearize",
    "list_attentions",
    "load",
]
