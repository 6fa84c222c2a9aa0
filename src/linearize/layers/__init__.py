"""nn.Modules: feature maps, the attention layer, its config registry and state."""

from linearize.layers.attention import Attention, AttentionState, TreeKV, build_attention
from linearize.layers.config import (
    ABLATIONS,
    ATTENTIONS,
    AttentionConfig,
    attention_config,
    list_attentions,
)

__all__ = [
    "ABLATIONS",
    "ATTENTIONS",
    "Attention",
    "AttentionConfig",
    "AttentionState",
    "TreeKV",
    "attention_config",
    "build_attention",
    "list_attentions",
]
