"""Token ids of a text source: tokenization, the token cache, and the one function that turns a
source into training and held-out tokens."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from linearize.data.corpora import _ALIASES, CORPORA, check_source, load_text
from linearize.paths import PathLike, atomic_write, cache_dir

log = logging.getLogger(__name__)


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids `[T]` of `text` as one string: no BOS, no special tokens.

    The whole text is encoded at once (fast tokenizers handle megabytes), so the ids equal those
    of any window cut from them; the too-long-for-the-model warning is off on purpose."""
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (16 hex digits) of the tokenizer's serialization (vocab, merges, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()[:16]


class TokenCache:
    """Tokenized corpora on disk: `<cache>/tokens/<corpus>-<tokenizer fingerprint>.safetensors`.

    User text is keyed by the sha256 of its content."""

    def __init__(self, cache: PathLike | None = None) -> None:
        self.cache = cache_dir(cache)
        self.root = self.cache / "tokens"

    def path(self, key: str, tokenizer: Any) -> Path:
        return self.root / f"{key}-{tokenizer_fingerprint(tokenizer)}.safetensors"

    def tokens(self, source: PathLike, tokenizer: Any, *, text_field: str = "text") -> torch.Tensor:
        """Token ids `[T]` of `source` (as for `load_text`), tokenized once and then cached."""
        text = None
        if isinstance(source, str) and source in CORPORA:
            key = _ALIASES.get(source, source).replace(":", "_")
        else:
            text = load_text(source, text_field=text_field)
            key = "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        path = self.path(key, tokenizer)
        if path.is_file():
            try:
                return load_file(path)["tokens"]
            except (SafetensorError, KeyError) as err:
                log.warning("unreadable token cache %s (%s); tokenizing again", path, err)
        if text is None:
            text = load_text(source, cache=self.cache)
        tokens = tokenize_text(text, tokenizer)
        self.root.mkdir(parents=True, exist_ok=True)
        metadata = {"source": str(source)}
        atomic_write(path, lambda tmp: save_file({"tokens": tokens}, tmp, metadata=metadata))
        log.info("cached %d tokens of %s in %s", len(tokens), source, path)
        return tokens


EVAL_TOKENS = 50_176


def eval_tokens(
    tokenizer: Any, n: int = EVAL_TOKENS, cache: PathLike | None = None
) -> torch.Tensor:
    """The evaluation split `[n]`: the first `n` tokens of Pride and Prejudice."""
    tokens = TokenCache(cache).tokens("prideprejudice", tokenizer)
    if not 0 < n <= len(tokens):
        raise ValueError(f"n={n} evaluation tokens asked; Pride and Prejudice has {len(tokens)}")
    return tokens[:n].clone()


def source_tokens(
    source: PathLike, tokenizer: Any, *, text_field: str = "text", cache: PathLike | None = None
) -> torch.Tensor:
    """All token ids `[T]` of `source`: `"austen:eval"` (the first `EVAL_TOKENS` tokens of
    *Pride and Prejudice*), another built-in corpus (`"austen"`, `"mobydick"`, ...), or a
    .txt/.md/.jsonl file or folder (see `load_text`); tokenized once, then read from the cache."""
    check_source(source)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: it cannot read text (save one with it)")
    if source == "austen:eval":
        return eval_tokens(tokenizer, cache=cache)
    return TokenCache(cache).tokens(source, tokenizer, text_field=text_field)


def split_tokens(
    source: PathLike,
    tokenizer: Any,
    n_eval: int = EVAL_TOKENS,
    *,
    held_out: PathLike | None = None,
    text_field: str = "text",
    cache: PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training and held-out token ids `[T]`, `[E]` of `source` (the one place a source becomes
    the tokens a run trains and evaluates on).

    With `held_out` (another source): all of `source`, and the first `n_eval` tokens of
    `held_out`. Else `"austen"`: the five novels other than *Pride and Prejudice*, and the
    first `n_eval` tokens of *Pride and Prejudice*; any other source: its last tenth (at most
    `n_eval` tokens) held out. The held-out part is None when it would hold fewer than 2 tokens."""
    if n_eval < 0:
        raise ValueError(f"n_eval must be >= 0, got {n_eval}")
    if held_out is not None:
        train = source_tokens(source, tokenizer, text_field=text_field, cache=cache)
        tail = source_tokens(held_out, tokenizer, text_field=text_field, cache=cache)
        return train, (tail[:n_eval] if min(n_eval, len(tail)) >= 2 else None)
    if source == "austen":
        n_eval = min(n_eval, EVAL_TOKENS)
        train = source_tokens(source, tokenizer, cache=cache)
        return train, (eval_tokens(tokenizer, n_eval, cache) if n_eval >= 2 else None)
    tokens = source_tokens(source, tokenizer, text_field=text_field, cache=cache)
    n_eval = min(n_eval, len(tokens) // 10)
    if n_eval < 2:
        return tokens, None
    return tokens[:-n_eval], tokens[-n_eval:]
