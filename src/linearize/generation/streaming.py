"""Prompts in, text out: prompt encoding (plain or chat), the check that a prompt fits the
positions a model was trained on, and incremental detokenization.

:class:`TextStream` turns tokens into text deltas as they arrive. It decodes the whole generated
sequence each time (so merges and leading-space rules come out exactly as a final decode would),
holds back a trailing incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives)
and any tail that could still become a stop string, and cuts the text before the first stop
string.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from numbers import Integral
from typing import Any

from linearize.generation.config import GenerationConfig

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


def _is_token_id(value: Any) -> bool:
    """An integer (Python, numpy or a 0-dim integer tensor), not a bool, float or string."""
    if isinstance(value, bool | str | bytes):
        return False
    if isinstance(value, Integral):
        return True
    is_float = getattr(value, "is_floating_point", None)
    return is_float is not None and getattr(value, "numel", lambda: 0)() == 1 and not is_float()


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int], *, chat: bool = False) -> list[int]:
    """Token ids of ``prompt`` (text, or ids passed through); ``chat`` applies the tokenizer's
    chat template to one user message and adds the assistant's generation prompt."""
    if not isinstance(prompt, str):
        bad = [i for i in prompt if not _is_token_id(i)]
        if bad:
            raise TypeError(f"token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
        ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if chat:
            raise ValueError("chat=True needs the prompt as text, not token ids")
        return ids
    if not prompt:
        raise ValueError("the prompt is empty: give some text")
    if tokenizer is None:
        raise ValueError(
            "this model has no tokenizer (its directory holds no tokenizer.json), so text cannot "
            "be encoded: save the model with its tokenizer, or pass token ids from Python"
        )
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    return list(ids)


def check_context(model: Any, prompt_tokens: int, config: GenerationConfig) -> GenerationConfig:
    """``config``, its ``max_new_tokens`` cut to what fits in the model's trained positions when
    it has softmax layers (their output past them is untested). A prompt that does not fit is
    refused, unless ``config.allow_long_context``; past the limit, say what the model does."""
    limit = model.config.max_position_embeddings
    needed = prompt_tokens + config.max_new_tokens
    if needed <= limit:
        return config
    softmax_layers = model.softmax_layers()
    if softmax_layers and not config.allow_long_context:
        if prompt_tokens < limit:
            logger.warning(
                "generating at most %d tokens: the model's softmax layers were trained on %d "
                "positions (allow_long_context=True / --allow-long-context to go past them)",
                limit - prompt_tokens,
                limit,
            )
            return dataclasses.replace(config, max_new_tokens=limit - prompt_tokens)
        raise ValueError(
            f"the prompt ({prompt_tokens} tokens) does not fit in this model's trained positions "
            f"(max_position_embeddings={limit}) and layers {softmax_layers[:4]}"
            f"{'...' if len(softmax_layers) > 4 else ''} are softmax attention, whose output is "
            "untested past them: shorten the prompt, or allow it explicitly "
            "(allow_long_context=True, --allow-long-context)"
        )
    if softmax_layers:
        logger.warning(
            "generating up to position %d, past the %d positions the model was trained on; "
            "softmax layers run on untrained positions (allowed explicitly)",
            needed,
            limit,
        )
    else:  # what linear layers are for; `eval ppl --stream` measures quality by position
        logger.info(
            "generating up to position %d, past the original's %d positions: the linear layers "
            "decode from their fixed-size state",
            needed,
            limit,
        )
    return config


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation (``{"role", "content"}`` dicts) through the tokenizer's chat
    template, followed by the assistant's generation prompt unless told otherwise."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: it cannot format chat messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template: send plain prompts")
    text = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the messages encode to no tokens")
    return list(ids)


class TextStream:
    """``push(token) -> delta`` and ``finish() -> delta``; ``text`` is the text so far and
    ``stopped`` says a stop string was reached (``text`` ends before it)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _held_back(self, text: str) -> int:
        """How many trailing characters to keep back: an incomplete character, or a tail that
        is a proper prefix of a stop string."""
        end = len(text)
        while end > self.emitted and text[end - 1] == REPLACEMENT:
            end -= 1
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, end), 0, -1):
                if text[end - n : end] == s[:n]:
                    hold = max(hold, n)
                    break
        return len(text) - end + hold

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self._decode()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            self.text = text[: min(cuts)]
            return self._emit(len(self.text))
        self.text = text
        return self._emit(len(text) - self._held_back(text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

    def finish(self) -> str:
        """Everything not emitted yet (a dangling partial character or stop-string prefix)."""
        return self._emit(len(self.text))
