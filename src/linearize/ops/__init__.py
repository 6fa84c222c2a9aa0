"""Pure tensor functions: one module per attention family, each with all its forms."""

from linearize.ops import causal_conv, linear_attn, linformer, softmax

__all__ = ["causal_conv", "linear_attn", "linformer", "softmax"]
