"""Data: the corpora and user text (`corpora`, `rdata`), token ids and their cache (`tokens`),
training blocks and their order (`blocks`)."""

from linearize.data.blocks import BlockSampler, StreamSampler, block_order, pack_blocks
from linearize.data.corpora import CORPORA, TEXT_SUFFIXES, Corpus, fetch_deb, load_text
from linearize.data.rdata import read_rdata, unserialize_r
from linearize.data.tokens import (
    EVAL_TOKENS,
    TokenCache,
    eval_tokens,
    source_tokens,
    split_tokens,
    tokenize_text,
    tokenizer_fingerprint,
)

__all__ = [
    "CORPORA",
    "EVAL_TOKENS",
    "TEXT_SUFFIXES",
    "BlockSampler",
    "StreamSampler",
    "Corpus",
    "TokenCache",
    "block_order",
    "eval_tokens",
    "fetch_deb",
    "load_text",
    "pack_blocks",
    "read_rdata",
    "source_tokens",
    "split_tokens",
    "tokenize_text",
    "tokenizer_fingerprint",
    "unserialize_r",
]
