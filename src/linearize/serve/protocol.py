"""The OpenAI wire format: request bodies parsed into typed requests, errors, response objects.

Bodies are parsed by hand (not by pydantic models) so every bad field gets an OpenAI-style
error object — ``{"error": {"message", "type", "param", "code"}}`` — naming the value and what
is allowed. Extension fields: ``speculative`` in requests (``none | medusa | lookup``),
``ignore_eos`` (generate ``max_tokens`` whatever the model says; for benchmarks), and
``token_ids`` beside each choice's text in responses.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from linearize.generation.config import GenerationConfig

ROLES = ("system", "developer", "user", "assistant")
# Our finish reasons → OpenAI's.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}
MAX_STOP_STRINGS = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    """An error the client caused (4xx) or the server hit (5xx), as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Request:
    """One generation request, whatever the endpoint: a prompt (text or ids, or messages) and
    how to decode it."""

    kind: str  # "completion" | "chat"
    model: str
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise _bad(f"{name} must lie in [{low}, {high}], got {value}", name)
    return float(value)


def _max_tokens(body: dict, default: int, limit: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return min(default, limit)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"max_tokens must be an integer, got {value!r}", "max_tokens")
    if not 1 <= value <= limit:
        raise _bad(f"max_tokens must lie in [1, {limit}] on this server, got {value}", "max_tokens")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP_STRINGS
    ):
        raise _bad(
            f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
            f"got {stop!r}",
            "stop",
        )
    return stops


def _config(
    body: dict, *, default_max_tokens: int, limit: int, speculative: tuple
) -> GenerationConfig:
    n = body.get("n", 1)
    if n != 1:
        raise _bad(f"n must be 1 on this server (one choice per request), got {n!r}", "n")
    if body.get("logprobs") or body.get("echo") or body.get("tools"):
        raise _bad("logprobs, echo and tools are not supported by this server")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"seed must be an integer, got {seed!r}", "seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    mode = body.get("speculative", "none")
    if mode not in speculative:
        hint = " (this model has no Medusa heads)" if mode == "medusa" else ""
        raise _bad(f"speculative={mode!r}; allowed{hint}: {list(speculative)}", "speculative")
    config = GenerationConfig(
        max_new_tokens=_max_tokens(body, default_max_tokens, limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed,
        stop=_stop(body),
        stop_token_ids=[] if ignore_eos else None,
        speculative=mode,
    )
    try:
        return config.validate()
    except ValueError as e:
        raise _bad(str(e)) from None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad(f"stream_options must be an object, got {options!r}", "stream_options")
    return stream, bool(options.get("include_usage", False))


def _model(body: dict, served: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: the id from GET /v1/models", "model")
    if model != served:
        raise APIError(
            404,
            f"model {model!r} does not exist on this server; it serves {served!r}",
            param="model",
            code="model_not_found",
        )
    return model


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):
        # The "content parts" form: only text parts are understood.
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        if len(texts) != len(content) or not all(
            p.get("type") == "text" and isinstance(t, str)
            for p, t in zip(content, texts, strict=True)
        ):
            raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(texts)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string, got {content!r}", "messages")
    return content


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages is required: a non-empty list of {role, content}", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object, got {message!r}", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role={role!r}; allowed: {list(ROLES)}", "messages")
        # "developer" is the newer name of "system"; chat templates know "system".
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _content(message, i)})
    return out


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise _bad(
        "prompt is required: a non-empty string or list of token ids (one prompt per request)",
        "prompt",
    )


def parse_completion(body: Any, served: str, limit: int, speculative: tuple) -> Request:
    body = _object(body)
    model = _model(body, served)
    stream, usage = _stream(body)
    config = _config(
        body,
        default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
        limit=limit,
        speculative=speculative,
    )
    return Request("completion", model, config, stream, usage, prompt=_prompt(body))


def parse_chat(body: Any, served: str, limit: int, speculative: tuple) -> Request:
    body = _object(body)
    model = _model(body, served)
    messages = _messages(body)
    stream, usage = _stream(body)
    config = _config(body, default_max_tokens=limit, limit=limit, speculative=speculative)
    return Request("chat", model, config, stream, usage, messages=messages)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# --- responses ---------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _choice(kind: str, text: str, token_ids: list[int], finish: str | None, delta: bool):
    choice: dict[str, Any] = {"index": 0}
    if kind == "chat":
        key = "delta" if delta else "message"
        choice[key] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    choice["finish_reason"] = finish
    choice["token_ids"] = token_ids
    return choice


def response(
    request: Request, rid: str, text: str, token_ids: list[int], finish: str, use: dict
) -> dict[str, Any]:
    """The whole (non-streamed) response object."""
    kind = request.kind
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [_choice(kind, text, token_ids, finish, delta=False)],
        "usage": use,
    }


def chunk(
    request: Request,
    rid: str,
    text: str,
    token_ids: list[int],
    finish: str | None = None,
    use: dict | None = None,
) -> dict[str, Any]:
    """One streamed chunk (``use`` alone: the final usage chunk, with no choices)."""
    kind = request.kind
    choices = [] if use is not None else [_choice(kind, text, token_ids, finish, delta=True)]
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
    }
    if use is not None:
        out["usage"] = use
    return out
