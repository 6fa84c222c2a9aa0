"""``linearize serve``: an OpenAI-compatible HTTP server with continuous batching and a prefix
state cache (every session costs one fixed-size state on a linear-attention model)."""

from linearize.serve.app import build_app, serve_in_thread
from linearize.serve.config import QUANTS, ServeConfig
from linearize.serve.prefix_cache import PrefixCache
from linearize.serve.scheduler import Event, Job, QueueFull, Scheduler

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
