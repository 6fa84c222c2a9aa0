"""The typed server config the ``linearize serve`` flags derive from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from linearize.config import Config, option
from linearize.engine import Engine, check_engine
from linearize.engine.step import KvType, check_kv_type
from linearize.models.quantize import QUANTS as WEIGHT_FORMATS
from linearize.models.quantize import check_quant

# Weight formats the server can run: the model as loaded ("none"), or its weights quantized as it
# loads (models/quantize.py; the server's batched rows run the PyTorch path on them: bf16 is the
# fast one for many streams on a CPU with AVX512-BF16, docs/results.md "Serving").
QUANTS = tuple(WEIGHT_FORMATS)
Quant = Literal["none", "int8", "int4", "bf16"]


@dataclass
class ServeConfig(Config):
    """Where the server listens, who may call it, and how much it takes on at once."""

    keys_name = "serve config keys"

    model: str = option("model name or path (served under this id)", "smollm2-135m")
    host: str = option("address to bind (127.0.0.1: this machine only)", "127.0.0.1")
    port: int = option("TCP port", 8000)
    api_key: str | None = option("require 'Authorization: Bearer KEY' (unset: open)", None)
    quant: Quant = option(
        "weights: as loaded (none; a quantized directory stays quantized) or int8 / int4 / bf16",
        "none",
    )
    engine: Engine = option(
        "decoding engine: auto (onnx for an int8 / int4 model, else torch), torch (the rows in "
        "one batched PyTorch step) or onnx (ONNX Runtime: the rows in as many groups as "
        "--threads, each group one run of the step graph on a thread of its own)",
        "auto",
    )
    kv_type: KvType | None = option(
        "the onnx engine's keys and values in softmax windows and caches: float32, float16 "
        "(llama.cpp's cache) or int8 (a float32 scale per 32); unset: float16 for quantized "
        "weights, else float32",
        None,
    )
    max_prompt_tokens: int = option("longest prompt accepted, in tokens", 8192)
    max_tokens: int = option("most new tokens one request may ask for", 2048)
    max_sessions: int = option("requests decoded together (rows of the batch)", 16)
    max_queue: int = option("requests waiting for a row before 429", 64)
    prefill_chunk: int = option(
        "prompt tokens prefilled per scheduler step (the other rows decode in between)", 512
    )
    cache_bytes: int = option("prefix state cache budget in bytes (0: off)", 2 * 1024**3)
    speculative: tuple[str, ...] = option(
        "speculative modes a request may ask for", ("none", "medusa", "lookup")
    )

    def validate(self) -> ServeConfig:
        check_quant(self.quant)
        check_engine(self.engine)
        if self.kv_type is not None:
            check_kv_type(self.kv_type)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must lie in [0, 65535] (0: any free port), got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty (or unset for an open server)")
        for name in ("max_prompt_tokens", "max_tokens", "max_sessions", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.cache_bytes < 0:
            raise ValueError(
                f"max_queue and cache_bytes must be >= 0, got {self.max_queue}, {self.cache_bytes}"
            )
        unknown = set(self.speculative) - {"none", "medusa", "draft", "lookup"}
        if unknown or "none" not in self.speculative:
            raise ValueError(
                f"speculative={self.speculative!r}: 'none' plus any of 'medusa', 'draft', 'lookup'"
            )
        return self

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["api_key"] = None if self.api_key is None else "***"
        return out
