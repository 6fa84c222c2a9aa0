"""A tiny stand-in for the demo's model and data, so the whole pipeline runs in a minute."""

from __future__ import annotations

from pathlib import Path

from linearize.demo.pipeline import DemoConfig
from linearize.models import Decoder, ModelConfig

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families, that he is considered as the rightful property of some "
    "one or other of their daughters."
)


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + an end-of-text token), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.add_special_tokens({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    return fast


def prepare(out: Path) -> DemoConfig:
    """A tiny random LLaMA-family model with a byte tokenizer and a small text, saved under
    ``out``; the returned config points the demo at them with tiny budgets."""
    base, text = out / "smoke-base", out / "smoke-text.txt"
    if not base.exists():
        tokenizer = byte_tokenizer()
        config = ModelConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = Decoder(config)
        model.tokenizer = tokenizer
        model.save(base)
    if not text.exists():
        text.write_text("\n\n".join([TEXT] * 12))
    return DemoConfig(
        model=str(base),
        budget=1536,
        block_size=64,
        batch_size=4,
        medusa_tokens=512,
        eval_tokens=512,
        eval_window=128,
        contexts=[128, 1024],
        decode_steps=2,
        new_tokens=8,
        data=str(text),
        eval_data=str(text),
        position_data=str(text),
        position_tokens=2048,
        position_buckets=[0, 256, 1024, 2048],
    )
