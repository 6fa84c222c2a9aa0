"""The HTTP side: an OpenAI-compatible FastAPI app around one :class:`Scheduler`.

``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` sends server-sent events ending with ``data: [DONE]``). The event loop only
parses, tokenizes and relays: the model runs on the scheduler's worker thread. A client that
disconnects cancels its request, and the worker drops its state at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from linearize.bench.memory import current_rss_bytes
from linearize.engine import build_engine, resolve_engine
from linearize.generation.medusa import MedusaHeads
from linearize.generation.streaming import encode_chat, encode_prompt
from linearize.models.decoder import Decoder
from linearize.models.quantize import keep_dequantized, weight_bytes
from linearize.serve import protocol
from linearize.serve.config import ServeConfig
from linearize.serve.prefix_cache import PrefixCache
from linearize.serve.protocol import APIError
from linearize.serve.scheduler import Event, Job, QueueFull, Scheduler

logger = logging.getLogger(__name__)

# How often a waiting handler checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


class _ClientGone(Exception):
    pass


def prompt_ids(model: Decoder, request: protocol.Request) -> tuple[list[int], list[int]]:
    """The request's prompt tokens and the prefix lengths worth caching: for a chat, where each
    message but the last ends (a system prompt, the earlier turns)."""
    tokenizer = model.tokenizer
    try:
        if request.kind == "completion":
            ids = encode_prompt(tokenizer, request.prompt)
            bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
            if bad:
                raise ValueError(
                    f"token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})"
                )
            return ids, []
        messages = request.messages
        ids = encode_chat(tokenizer, messages)
        boundaries = []
        for k in range(1, len(messages)):
            prefix = encode_chat(tokenizer, messages[:k], add_generation_prompt=False)
            if ids[: len(prefix)] == prefix:
                boundaries.append(len(prefix))
        return ids, boundaries
    except ValueError as e:
        param = "messages" if request.kind == "chat" else "prompt"
        raise APIError(400, str(e), param=param) from None
    except Exception as e:  # a chat template may reject a conversation (e.g. role order)
        message = f"the chat template rejected the messages: {e}"
        raise APIError(400, message, param="messages") from None


def build_app(model: Decoder, config: ServeConfig, heads: MedusaHeads | None = None) -> FastAPI:
    """The app serving ``model`` under the id ``config.model`` (``heads``: its Medusa heads, for
    ``"speculative": "medusa"``); its scheduler starts and stops with the app."""
    config = config.validate()
    model.eval()
    served = config.model
    added = keep_dequantized(model)
    if added:
        # Whatever runs on PyTorch (prompts; the batched rows with --engine torch; speculative
        # rows): dequantizing every weight on every step made an int4 model serve at ~3
        # tokens/s (docs/results.md, "Serving the default model").
        logger.info(
            "keeping the %s weights' float copies in memory (+%.0f MB): the PyTorch path "
            "multiplies by them instead of dequantizing every call",
            model.quantization.quant,
            added / 1e6,
        )
    engine, workers = None, torch.get_num_threads()
    name = resolve_engine(config.engine, model)
    if name != "torch":
        # Plain rows step on it in as many groups as there are threads, each group one run
        # on a thread of its own; prompts and speculative rows stay on the PyTorch path (the
        # prefix cache holds PyTorch states).
        context = config.max_prompt_tokens + config.max_tokens
        engine = build_engine(name, model, max_context=context, threads=1, kv_type=config.kv_type)
        if config.max_sessions > 1:  # the rows' graph at start, not in the first busy step
            engine.prepare_rows()
    cache = PrefixCache(config.cache_bytes)
    scheduler = Scheduler(
        model,
        cache,
        max_sessions=config.max_sessions,
        max_queue=config.max_queue,
        prefill_chunk=config.prefill_chunk,
        heads=heads,
        engine=engine,
        workers=workers,
    )
    created = int(time.time())
    # Medusa only where the served model has heads (a request asking for it gets a 400).
    speculative = tuple(m for m in config.speculative if m != "medusa" or heads is not None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="linearize", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.config = config

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(
            APIError(error.status_code, str(error.detail), code=code).body(),
            status_code=error.status_code,
        )

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        if request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise APIError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    # Every parameter and buffer: a quantized model's codes, and the float copies kept of them.
    weights = weight_bytes(model)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = scheduler.stats()
        return {
            "status": "ok",
            "model": served,
            "engine": name,
            "kv_type": getattr(engine, "kv_type", None),
            "model_bytes": weights,
            "rss_bytes": current_rss_bytes(),
            **stats,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        card = {"id": served, "object": "model", "created": created, "owned_by": "linearize"}
        return {"object": "list", "data": [card]}

    async def generate(request: Request, parse: Callable[..., protocol.Request]):
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        req = parse(body, served, config.max_tokens, speculative)
        ids, boundaries = prompt_ids(model, req)
        if len(ids) > config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens; this server accepts at most "
                f"{config.max_prompt_tokens}",
                param="messages" if req.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(events.put_nowait, event)

        rid = protocol.new_id(req.kind)
        job = Job(rid, ids, req.config, emit, boundaries)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy ({e}); retry later",
                type="requests",
                code="rate_limit_exceeded",
            ) from None

        checked = time.monotonic()

        async def next_event() -> Event:
            # The client is checked every DISCONNECT_POLL_S, also while tokens keep coming (a
            # non-streaming client that left would otherwise be noticed only at the end).
            nonlocal checked
            while True:
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise _ClientGone
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)

        def cancel() -> None:
            job.cancel()
            scheduler.wake()

        try:
            first = await next_event()
        except (_ClientGone, asyncio.CancelledError):
            cancel()
            raise
        if first.kind == "error":
            raise APIError(first.info["status"], first.info["message"])
        if req.stream:
            return StreamingResponse(
                _sse(req, rid, first, next_event, cancel), media_type="text/event-stream"
            )
        try:
            return await _collect(req, rid, first, next_event)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it: the client left
        finally:
            cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, protocol.parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, protocol.parse_chat)

    return app


def _usage(info: dict[str, Any]) -> dict[str, Any]:
    return protocol.usage(info["prompt_tokens"], info["completion_tokens"], info["cached_tokens"])


async def _collect(req: protocol.Request, rid: str, event: Event, next_event) -> dict[str, Any]:
    text, ids = [], []
    while event.kind == "delta":
        text.append(event.text)
        ids.extend(event.token_ids)
        event = await next_event()
    if event.kind == "error":
        raise APIError(event.info["status"], event.info["message"])
    finish = protocol.FINISH_REASONS[event.info["finish_reason"]]
    return protocol.response(req, rid, "".join(text), ids, finish, _usage(event.info))


def _data(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _sse(
    req: protocol.Request, rid: str, event: Event, next_event, cancel: Callable[[], None]
) -> AsyncIterator[str]:
    try:
        while True:
            if event.kind == "delta":
                yield _data(protocol.chunk(req, rid, event.text, event.token_ids))
            elif event.kind == "done":
                finish = protocol.FINISH_REASONS[event.info["finish_reason"]]
                yield _data(protocol.chunk(req, rid, "", [], finish))
                if req.include_usage:
                    yield _data(protocol.chunk(req, rid, "", [], use=_usage(event.info)))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _data(APIError(event.info["status"], event.info["message"]).body())
                yield "data: [DONE]\n\n"
                return
            event = await next_event()
    except _ClientGone:
        return
    finally:
        cancel()


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a background thread (tests, benchmarks); yields its base URL
    (``port=0``: a free port) and shuts it down on exit."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="linearize-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
