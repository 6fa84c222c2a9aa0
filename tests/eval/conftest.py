"""Tiny models (and a tiny tokenizer) for the evaluation and benchmark tests."""

from __future__ import annotations

import pytest
import torch

from linearize import Decoder, ModelConfig, linearize

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters.\n"
) * 4


def tiny_config(**overrides) -> ModelConfig:
    options = dict(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    )
    return ModelConfig(**{**options, **overrides})


def randomise_new_parameters(model: Decoder) -> Decoder:
    """α and the conv taps start at zero; give them values so every part is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "conv")):
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def tiny_augmented(dtype: torch.dtype = torch.float64, **options) -> Decoder:
    model = Decoder(tiny_config())
    spec = {
        "name": "augmented",
        "size": 8,
        "conv": "causal",
        "conv_size": 4,
        "chunk_size": 8,
        **options,
    }
    linearize(model, spec)
    return randomise_new_parameters(model).to(dtype).eval()


def tiny_tokenizer():
    """A BPE tokenizer with at most 128 ids, trained on TEXT (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Saved tiny models: ``softmax`` (max 64 positions) and ``augmented``, with a tokenizer,
    plus a text file ``text``."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    softmax = Decoder(tiny_config(max_position_embeddings=64))
    softmax.tokenizer = tiny_tokenizer()
    softmax.save(root / "softmax")
    augmented = tiny_augmented(torch.float32)
    augmented.tokenizer = softmax.tokenizer
    augmented.save(root / "augmented")
    (root / "text.txt").write_text(TEXT)
    return {name: str(root / name) for name in ("softmax", "augmented")} | {
        "text": str(root / "text.txt")
    }
