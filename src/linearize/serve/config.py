"""The typed server config the ``linearize serve`` flags derive from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# Weight formats the server can run. Only fp32/the model's own dtype today: a quantized engine
# registers its name here (and is picked in ``serve.app.load_model``).
QUANTS = ("none",)
Quant = Literal["none"]


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ServeConfig:
    """Where the server listens, who may call it, and how much it takes on at once."""

    model: str = _help("model name or path (served under this id)", "smollm2-135m")
    host: str = _help("address to bind (127.0.0.1: this machine only)", "127.0.0.1")
    port: int = _help("TCP port", 8000)
    api_key: str | None = _help("require 'Authorization: Bearer KEY' (None: open)", None)
    quant: Quant = _help("weight format: none", "none")
    max_prompt_tokens: int = _help("longest prompt accepted, in tokens", 8192)
    max_tokens: int = _help("most new tokens one request may ask for", 2048)
    max_sessions: int = _help("requests decoded together (rows of the batch)", 16)
    max_queue: int = _help("requests waiting for a row before 429", 64)
    prefill_chunk: int = _help(
        "prompt tokens prefilled per scheduler step (the other rows decode in between)", 512
    )
    cache_bytes: int = _help("prefix state cache budget in bytes (0: off)", 2 * 1024**3)
    speculative: tuple[str, ...] = _help(
        "speculative modes a request may ask for", ("none", "medusa", "lookup")
    )

    def validate(self) -> ServeConfig:
        if self.quant not in QUANTS:
            raise ValueError(f"quant={self.quant!r}; allowed: {list(QUANTS)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must lie in [1, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty (or None for an open server)")
        for name in ("max_prompt_tokens", "max_tokens", "max_sessions", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.cache_bytes < 0:
            raise ValueError(
                f"max_queue and cache_bytes must be >= 0, got {self.max_queue}, {self.cache_bytes}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = None if self.api_key is None else "***"
        return out
