"""``linearize serve``: an OpenAI-compatible HTTP server with continuous batching and a prefix
state cache (every session costs one fixed-size state on a linear-attention model).

The HTTP app (``build_app``, ``serve_in_thread``: fastapi) is imported when first named, not
with the package: every ``linearize`` command reads ``ServeConfig`` to build its parser.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from linearize.serve.config import QUANTS, ServeConfig
from linearize.serve.prefix_cache import PrefixCache
from linearize.serve.scheduler import Event, Job, QueueFull, Scheduler

if TYPE_CHECKING:
    from linearize.serve.app import build_app, serve_in_thread


def __getattr__(name: str) -> Any:
    if name in ("build_app", "serve_in_thread"):
        return getattr(importlib.import_module("linearize.serve.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QUANTS",
    "Event",
    "Job",
    "PrefixCache",
    "QueueFull",
    "Scheduler",
    "ServeConfig",
    "build_app",
    "serve_in_thread",
]
