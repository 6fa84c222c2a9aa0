"""This machine's speculation timings, kept across processes.

Before it speculates on a fast engine, :class:`~linearize.generation.decode.Decoding` times a
plain step against tree passes of several sizes (:func:`~linearize.generation.planner.
calibrate_engine`): 1–4 s a process, and most of a short ``linearize generate`` (the tree
graphs' sessions are loaded only to be timed, and on a CPU where plain decoding wins, never
used). The timings depend on the engine's graphs, the state's reach, the threads, the
proposer's shapes and the machine, not on the prompt or the weights' values: a
:class:`CalibrationStore` keeps each measurement under a key of exactly those
(:func:`calibration_key`) and hands it back to the next process with the same key.

A stored file is one JSON object (``key``, ``calibration``, ``measured``, UTC), written
atomically; one that cannot be read is measured again and replaced. ``refresh=True``
(``linearize generate --recalibrate``) times again and replaces what is stored, for a
machine whose load or settings changed since.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linearize.generation.planner import Calibration
from linearize.paths import PathLike, atomic_write, cache_dir

logger = logging.getLogger(__name__)


def shapes_key(*modules: nn.Module | None) -> str:
    """A digest of the parameters' and buffers' names, shapes and dtypes of ``modules``: what
    their cost per call depends on (their values do not change it)."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            digest.update(b"none;")
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def proposer_key(proposer: Any) -> str:
    """What a proposer's own cost per step (:attr:`Calibration.overhead`) depends on."""
    kind = proposer.kind
    if kind == "medusa":
        return f"medusa:{shapes_key(proposer.heads, proposer.lm_head)}:top{proposer.top_k}"
    if kind == "draft":
        return f"draft:{shapes_key(proposer.draft)}"
    return kind


def calibration_key(
    engine: Any, proposer: Any, sizes: list[int], chain: bool, ceiling: float
) -> dict[str, Any]:
    """The key of a calibration of ``proposer``'s trees of ``sizes`` on ``engine`` now: the
    engine's graphs, reach, threads and machine (``engine.timing_key()``), the proposer's
    shapes and PyTorch's threads (the proposer runs there), the tree sizes and kind, and the
    ceiling that stops the timing early."""
    return {
        "engine": engine.timing_key(),
        "proposer": proposer_key(proposer),
        "torch_threads": torch.get_num_threads(),
        "sizes": list(sizes),
        "chain": chain,
        "ceiling": ceiling,
    }


class CalibrationStore:
    """Calibrations by key, one JSON file each in ``folder`` (default: the cache folder's
    ``calibrations/``). ``refresh``: :meth:`get` finds nothing, so every calibration is timed
    again and :meth:`put` replaces the stored one."""

    def __init__(self, folder: PathLike | None = None, *, refresh: bool = False) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir() / "calibrations"
        self.refresh = refresh

    def path(self, key: dict[str, Any]) -> Path:
        text = json.dumps(key, sort_keys=True)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def get(self, key: dict[str, Any]) -> Calibration | None:
        """The calibration stored under ``key``, or ``None`` (none, unreadable, or refreshing)."""
        path = self.path(key)
        if self.refresh or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["key"] != key:
                raise ValueError("its key differs")
            calibration = Calibration.from_dict(data["calibration"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("stored speculation timings %s unreadable (%s): timing again", path, e)
            return None
        logger.info(
            "speculation: this machine's timings measured %s (%s; --recalibrate times again)",
            data.get("measured", "earlier"),
            path,
        )
        return calibration

    def put(self, key: dict[str, Any], calibration: Calibration) -> None:
        """Store ``calibration`` under ``key`` (atomically; a store that cannot be written is
        logged and skipped: the timings are only an optimisation)."""
        path = self.path(key)
        measured = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        data = {"key": key, "calibration": calibration.to_dict(), "measured": measured}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data), encoding="utf-8"))
        except OSError as e:
            logger.warning("could not store speculation timings in %s: %s", path, e)
