"""Tiny models the onnx engine runs: issue 12's augmented layer (shared denominator, decay, sinks
at cache positions) is not in the engine yet, so "augmented" here is the paper's layer."""

from __future__ import annotations

import torch

import linearize
from tests.generation.conftest import CONV, GROUP, byte_tokenizer, tiny_model

PAPER = {"name": "augmented_paper", "size": GROUP, "conv_size": CONV, "sink_positions": "absolute"}


def engine_model(kind: str, *, vocab_size: int = 128, text: bool = False) -> linearize.Decoder:
    """A float32 tiny model (``kind``: softmax, elu, augmented, hybrid, group) the engine runs;
    ``text``: with the byte tokenizer (vocabulary 258)."""
    if text:
        vocab_size = 258
    if kind in ("softmax", "elu"):
        model = tiny_model(kind, vocab_size=vocab_size)
    else:
        model = tiny_model("softmax", vocab_size=vocab_size)
        options = {"augmented": PAPER, "hybrid": PAPER}.get(kind)
        if kind == "group":
            options = {"name": "augmented_paper", "window": "group", "size": 4, "sinks": 0}
            options["conv_size"] = CONV
        layers = [1] if kind == "hybrid" else None
        linearize.linearize(model, options, layers=layers)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("conv"):
                    p.normal_(0, 0.3)
                elif name.endswith("alpha"):
                    p.fill_(0.7)
                elif p.dim() == 2 and "self_attn" in name and "feature_map" not in name:
                    p.normal_(0, 0.2)
    model = model.float().eval()
    if text:
        model.tokenizer = byte_tokenizer()
        model.config.eos_token_id = 1
    return model
