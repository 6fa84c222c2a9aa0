"""Memory measurements: peak RSS, available memory, memory bandwidth, and isolated runs.

Peak RSS is the kernel's high-water mark of the process (``VmHWM``; ``ru_maxrss`` elsewhere);
it never goes down, so a benchmark that wants the peak of one configuration runs it in a fresh
process (:func:`run_isolated`) and reads the mark there, at the end of the run. The number then
includes the interpreter, torch and the model weights: it is what the user's process would need.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import platform
import queue as queue_module
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# ru_maxrss is in kilobytes on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory
    map. ``ru_maxrss`` survives ``fork`` + ``exec``, so in a spawned child it would still report
    the parent's peak (the same number in every isolated benchmark row)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def current_rss_bytes() -> int:
    """This process's resident set size now, in bytes (``/proc``; the peak where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def _status_bytes(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset this process's resident high-water mark (Linux ``VmHWM``) to its RSS now."""
    Path("/proc/self/clear_refs").write_text("5")


def high_water_rss_bytes() -> int:
    """This process's resident high-water mark since the last :func:`reset_peak_rss` (Linux)."""
    return _status_bytes("VmHWM")


def available_memory_bytes() -> int:
    """Memory the system can give a new allocation without swapping (``MemAvailable``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def measure_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: the best of ``repeats`` copies of an ``nbytes`` float32
    tensor, counting the read and the write (``2 · nbytes`` per copy)."""
    if nbytes < 4 or repeats < 1:
        raise ValueError(f"need nbytes >= 4 and repeats >= 1, got {nbytes}, {repeats}")
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, threads, memory, versions."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory_bytes(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": _load_average(),
    }


def _load_average() -> float | None:
    # Other processes on the machine distort CPU timings: the record says how busy it was.
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _child(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = fn(*args)
        queue.put(("ok", result, peak_rss_bytes()))
    except BaseException as e:  # report every failure to the parent, then exit
        queue.put(("error", f"{type(e).__name__}: {e}", peak_rss_bytes()))


class RssSampler:
    """The highest RSS seen while the block runs (a thread polls /proc every ``period`` s), and
    ``added``, how far it rose over the RSS the block started from."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.peak = period, current_rss_bytes()
        self.start = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


def run_isolated(
    fn: Callable[..., Any], *args: Any, timeout: float | None = None
) -> tuple[Any, int]:
    """``(fn(*args), peak RSS in bytes)``, run in a fresh (spawned) process.

    ``fn`` must be a module-level function and its arguments picklable; an exception in the
    child is raised here as a ``RuntimeError`` carrying its message. A child still running after
    ``timeout`` seconds is killed and ``TimeoutError`` raised.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn, args))
    process.start()
    try:
        status, result, peak = queue.get(timeout=timeout)
    except queue_module.Empty:
        process.kill()
        raise TimeoutError(f"no result after {timeout:.0f} s") from None
    finally:
        process.join()
    if status != "ok":
        raise RuntimeError(result)
    return result, peak


def format_bytes(n: float | None) -> str:
    """``1.5 GB``-style text (powers of 1000); ``—`` for ``None``."""
    if n is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
