"""Serving benchmark: ``linearize serve`` in a subprocess (the server alone in its process, as
deployed), measured through its HTTP API.

1. aggregate tokens/s of 1 and of 8 concurrent greedy streams (goal: 8 streams ≥ 4× one);
2. time to first token of a chat whose ~2k-token system prompt is cached vs not (goal ≤ 0.1×);
3. server memory with 100 idle sessions (conversations whose state the server keeps), against
   model bytes + 100 × state bytes;
4. the softmax original served the same way: 8 streams at a 4k-token context (its KV caches
   grow). The original is ``--model`` as loaded when ``--attention`` linearizes it, else
   ``--softmax-model`` (a model served as loaded is not its own original).

This module talks HTTP only (it never imports the server package, which sits above it).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from linearize.config import Config, option
from linearize.engine import Engine, check_engine
from linearize.models.quantize import check_quant

SENTENCE = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. "
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``linearize serve`` in a subprocess; ``url``, ``health()``, ``close()``."""

    def __init__(
        self, model: str, attention: str | None, threads: int, log: str | None, *extra: str
    ) -> None:
        port = _free_port()
        self.model = model
        command = [sys.executable, "-m", "linearize", "serve", "--model", model]
        command += ["--port", str(port), "--threads", str(threads), *extra]
        if attention is not None:
            command += ["--attention", attention]
        # The server logs one line per request (timings) to stderr: kept in ``log`` if given.
        self.log = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log)
        self.url = f"http://127.0.0.1:{port}"
        import httpx  # (here: the CLI's parser imports this module for every command)

        self.http = httpx.Client(base_url=self.url, timeout=3600)
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}")
            try:
                self.health()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not come up in 10 minutes") from None
                time.sleep(0.5)

    def health(self) -> dict[str, Any]:
        return self.http.get("/health").json()

    def stream(self, body: dict[str, Any], path: str = "/v1/completions") -> dict[str, float]:
        """One streamed request: time to first chunk, seconds, completion tokens."""
        start = time.perf_counter()
        first, tokens = None, 0
        body = {"model": self.model, "temperature": 0, "stream": True, "ignore_eos": True, **body}
        with self.http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.read()!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    first = first or time.perf_counter()
                    tokens += len(chunk["choices"][0].get("token_ids", []))
        end = time.perf_counter()
        return {"ttft_s": (first or end) - start, "seconds": end - start, "tokens": tokens}

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(60)
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def _text(tokens: int, salt: str) -> str:
    """Roughly ``tokens`` tokens of text (SmolLM2's tokenizer: ~1.2 tokens per word)."""
    words = max(1, int(tokens / 1.25))
    base = (SENTENCE * (words // 20 + 1)).split()[:words]
    return f"{salt} " + " ".join(base)


def streams(server: Server, n: int, max_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    """``n`` concurrent greedy streams of ``max_tokens`` each: aggregate tokens/s."""
    results: list[dict[str, float]] = [{} for _ in range(n)]
    peak = {"state_bytes": 0, "rss_bytes": 0}
    done = threading.Event()

    def run(i: int) -> None:
        body = {"prompt": _text(prompt_tokens, f"Stream {i}."), "max_tokens": max_tokens}
        results[i] = server.stream(body)

    def watch() -> None:
        import httpx

        with httpx.Client(base_url=server.url) as http:
            while not done.wait(0.2):
                health = http.get("/health").json()
                for key in peak:
                    peak[key] = max(peak[key], health[key])

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    tokens = sum(r["tokens"] for r in results)
    return {
        "streams": n,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "mean_ttft_s": sum(r["ttft_s"] for r in results) / n,
        "peak_state_bytes": peak["state_bytes"],
        "peak_rss_bytes": peak["rss_bytes"],
    }


def cached_ttft(server: Server, system_tokens: int) -> dict[str, Any]:
    """TTFT of a chat with a new ~``system_tokens`` system prompt, then of a second chat with the
    same system prompt (its state now cached) and a different question."""
    system = {"role": "system", "content": _text(system_tokens, "You know Austen.")}
    out = {}
    for name, question in (("cold", "Who is Emma?"), ("cached", "Who is Mr Darcy?")):
        messages = [system, {"role": "user", "content": question}]
        body = {"messages": messages, "max_tokens": 1}
        out[f"{name}_ttft_s"] = server.stream(body, "/v1/chat/completions")["ttft_s"]
    cache = server.health()["prefix_cache"]
    out["ratio"] = out["cached_ttft_s"] / out["cold_ttft_s"]
    out["cache_hits"] = cache["hits"]
    return out


def idle_sessions(server: Server, n: int) -> dict[str, Any]:
    """Server memory after ``n`` distinct conversations, each kept as one cached state."""
    before = server.health()
    for i in range(n):
        body = {"messages": [{"role": "user", "content": f"Session {i}: hello."}], "max_tokens": 1}
        server.stream(body, "/v1/chat/completions")
    after = server.health()
    cache = after["prefix_cache"]
    kept = cache["entries"] - before["prefix_cache"]["entries"]
    per_state = (cache["bytes"] - before["prefix_cache"]["bytes"]) / max(kept, 1)
    return {
        "sessions": n,
        "states_kept": kept,
        "state_bytes": per_state,
        "model_bytes": after["model_bytes"],
        "rss_before_bytes": before["rss_bytes"],
        "rss_after_bytes": after["rss_bytes"],
        "rss_growth_bytes": after["rss_bytes"] - before["rss_bytes"],
        "expected_growth_bytes": kept * per_state,
    }


@dataclass
class ServeBenchConfig(Config):
    """What ``linearize bench serve`` measures."""

    model: str = option("model name or path", "smollm2-135m")
    attention: str = option(
        "linearize the model with this attention ('none': as loaded)", "augmented"
    )
    streams: list[int] = option(
        "concurrent stream counts (the first is the baseline)", factory=lambda: [1, 8]
    )
    max_tokens: int = option("tokens per stream", 64)
    prompt_tokens: int = option("prompt tokens per stream", 32)
    system_tokens: int = option("system prompt tokens (cached vs not)", 2048)
    sessions: int = option("idle sessions kept by the server", 100)
    softmax_context: int = option("context of the softmax original's streams (0: skip)", 4096)
    softmax_model: str | None = option(
        "the softmax original (default: --model, when --attention linearizes it; with "
        "--attention none there is no original unless given)",
        None,
    )
    softmax_streams: int = option("streams of the softmax original", 8)
    threads: int = option("torch threads of the server", 1)
    quant: str = option(
        "weights of the served models (serve --quant): none, int8, int4, bf16", "none"
    )
    engine: Engine = option("decoding engine of the served models (serve --engine)", "auto")
    server_log: str | None = option("append the servers' logs to this file", None)

    def validate(self) -> ServeBenchConfig:
        if not self.streams or min(self.streams) < 1:
            raise ValueError(f"streams must be positive counts, got {self.streams}")
        for name in ("max_tokens", "prompt_tokens", "system_tokens", "softmax_streams", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_quant(self.quant)
        check_engine(self.engine)
        if self.sessions < 0 or self.softmax_context < 0:
            raise ValueError("sessions and softmax_context must be >= 0")
        return self


def _row(measure: str, model: str, setting: str, result: str, goal: str, **values: Any) -> dict:
    return {
        "measure": measure,
        "model": model,
        "setting": setting,
        "result": result,
        "goal": goal,
        **values,
    }


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def run_serve_benchmark(config: ServeBenchConfig, progress=lambda message: None) -> list[dict]:
    """The rows of the serving benchmark (see the module docstring)."""
    config.validate()
    attention = None if config.attention == "none" else config.attention
    label = config.model if attention is None else f"{config.model}+{attention}"
    if config.quant != "none":
        label += f"+{config.quant}"
    limits = [
        "--quant",
        config.quant,
        "--engine",
        config.engine,
        "--max-sessions",
        str(max([*config.streams, config.softmax_streams])),
        "--max-tokens",
        str(config.max_tokens),
        "--max-prompt-tokens",
        str(max(config.system_tokens, config.softmax_context) + 512),
    ]
    rows = []
    progress(f"serving {label}")
    server = Server(
        config.model,
        attention,
        config.threads,
        config.server_log,
        *limits,
        "--cache-bytes",
        str(64 * 2**30),
    )
    try:
        engine = server.health()["engine"]  # (auto resolved by the server)
        label += f" ({engine})"
        server.stream({"prompt": "Warm up.", "max_tokens": 2})  # first-call allocations
        base = None
        for n in config.streams:
            progress(f"{n} streams")
            r = streams(server, n, config.max_tokens, config.prompt_tokens)
            base = base or r["tokens_per_s"]
            ratio = r["tokens_per_s"] / base
            rows.append(
                _row(
                    "aggregate tokens/s",
                    label,
                    f"{n} streams × {config.max_tokens} tokens",
                    f"{r['tokens_per_s']:.2f} tokens/s ({ratio:.2f}× {config.streams[0]} stream)",
                    "8 streams ≥ 4× 1",
                    **r,
                    vs_first=ratio,
                )
            )
        progress("cached system prompt")
        r = cached_ttft(server, config.system_tokens)
        rows.append(
            _row(
                "time to first token",
                label,
                f"~{config.system_tokens}-token system prompt",
                f"cached {r['cached_ttft_s']:.3f} s vs {r['cold_ttft_s']:.3f} s "
                f"({r['ratio']:.3f}×)",
                "≤ 0.1×",
                **r,
            )
        )
        if config.sessions:
            progress(f"{config.sessions} idle sessions")
            r = idle_sessions(server, config.sessions)
            rows.append(
                _row(
                    "memory, idle sessions",
                    label,
                    f"{config.sessions} sessions",
                    f"RSS +{_mb(r['rss_growth_bytes'])} for {r['states_kept']} states of "
                    f"{_mb(r['state_bytes'])} (model {_mb(r['model_bytes'])}, RSS "
                    f"{_mb(r['rss_after_bytes'])})",
                    "model + sessions × state",
                    **r,
                )
            )
    finally:
        server.close()
    for row in rows:
        row["engine"] = engine
    original = config.softmax_model or (config.model if attention is not None else None)
    if config.softmax_context and original is None:
        # A model served as loaded is its own original: measuring it again as "softmax" would
        # mislabel it.
        progress("no softmax original (--attention none): --softmax-model names one")
    if config.softmax_context and original is not None:
        quant_note = "" if config.quant == "none" else f", {config.quant}"
        progress(f"softmax original, {config.softmax_streams} streams at {config.softmax_context}")
        server = Server(original, None, config.threads, config.server_log, *limits)
        try:
            engine = server.health()["engine"]
            server.stream({"prompt": "Warm up.", "max_tokens": 2})
            r = streams(server, config.softmax_streams, config.max_tokens, config.softmax_context)
            rows.append(
                _row(
                    "aggregate tokens/s",
                    f"{original} (softmax{quant_note}, {engine})",
                    f"{config.softmax_streams} streams at {config.softmax_context} tokens",
                    f"{r['tokens_per_s']:.2f} tokens/s, states {_mb(r['peak_state_bytes'])}",
                    "report",
                    **r,
                    engine=engine,
                )
            )
        finally:
            server.close()
    for row in rows:
        row["quant"] = config.quant
    return rows
