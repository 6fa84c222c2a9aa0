"""Serving benchmark: ``python benchmarks/serve.py [--model smollm2-135m] [--json]``.

Starts ``linearize serve`` in a subprocess (the server alone in its process, as deployed) and
measures, through its HTTP API:

1. aggregate tokens/s of 1 and of 8 concurrent greedy streams (goal: 8 streams ≥ 4× one);
2. time to first token of a chat whose system prompt (~2k tokens) is cached vs not (goal ≤ 0.1×);
3. server memory with 100 idle sessions (conversations whose state the server keeps), against
   model bytes + 100 × state bytes;
4. the softmax original served the same way: 8 streams at a 4k-token context (its KV caches grow).

Speed numbers need a quiet machine. A smoke run: ``--streams 1,2 --max-tokens 8 --system-tokens
128 --sessions 4 --softmax-context 256 --softmax-streams 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--attention", default="augmented", help="'none': serve as loaded")
    parser.add_argument("--streams", default="1,8", help="concurrent stream counts")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt per stream")
    parser.add_argument("--system-tokens", type=int, default=2048)
    parser.add_argument("--sessions", type=int, default=100, help="idle sessions")
    parser.add_argument("--softmax-context", type=int, default=4096, help="0: skip softmax")
    parser.add_argument("--softmax-streams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--server-log", help="append the servers' logs to this file")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    attention = None if args.attention == "none" else args.attention
    counts = [int(n) for n in args.streams.split(",")]
    rows: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )

    limits = [
        "--max-sessions",
        str(max(counts + [args.softmax_streams])),
        "--max-tokens",
        str(max(args.max_tokens, 1)),
        "--max-prompt-tokens",
        str(max(args.system_tokens, args.softmax_context) + 512),
    ]
    server = Server(
        args.model,
        attention,
        args.threads,
        args.server_log,
        *limits,
        "--cache-bytes",
        str(64 * 2**30),
    )
    try:
        server.stream({"prompt": "Warm up.", "max_tokens": 2})  # first-call costs (allocations)
        base = None
        for n in counts:
            row = {
                "measure": "throughput",
                "model": attention or "as loaded",
                **streams(server, n, args.max_tokens, args.prompt_tokens),
            }
            base = base or row["tokens_per_s"]
            row["vs_1_stream"] = row["tokens_per_s"] / base
            report(row)
        report(
            {
                "measure": "cached_system_prompt",
                "system_tokens": args.system_tokens,
                **cached_ttft(server, args.system_tokens),
            }
        )
        report({"measure": "idle_sessions", **idle_sessions(server, args.sessions)})
    finally:
        server.close()
    if args.softmax_context:
        server = Server(args.model, None, args.threads, args.server_log, *limits)
        try:
            server.stream({"prompt": "Warm up.", "max_tokens": 2})
            row = streams(server, args.softmax_streams, args.max_tokens, args.softmax_context)
            report(
                {
                    "measure": "throughput_softmax",
                    "model": "original (softmax)",
                    "context": args.softmax_context,
                    **row,
                }
            )
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
