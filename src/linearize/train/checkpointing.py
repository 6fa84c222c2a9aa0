"""Training checkpoints, written atomically, and the run directory they live in.

A run directory holds::

    config.json          the TrainConfig (what the run computes)
    metrics.jsonl        one JSON record per step and per evaluation
    checkpoints/latest   the name of the newest complete checkpoint
    checkpoints/<name>/  params.safetensors (trained tensors), state.pt (optimizer, schedule,
                         RNG), trainer.json (stage, step, data position)
    model/               the final model (``model.save``), loadable without peft

A checkpoint is written into a temporary folder and renamed into place; only then does
``latest`` (itself replaced atomically) point to it. A run killed while writing leaves the
previous checkpoint in charge, and a failing run never replaces anything already saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from linearize.train.config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model"
KEEP = 2


@dataclass
class Checkpoint:
    """A loaded checkpoint: where the run was and what it held."""

    path: Path
    stage: str
    step: int
    position: int
    params: dict[str, Tensor]
    state: dict[str, Any]


def checkpoint_name(stage_index: int, stage: str, step: int) -> str:
    return f"{stage_index}-{stage}-step{step:08d}"


def _write_atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    run_dir: Path,
    *,
    stage_index: int,
    stage: str,
    step: int,
    position: int,
    params: dict[str, Tensor],
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically, point ``latest`` to it, keep the newest ``KEEP``."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(stage_index, stage, step)
    target = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=root))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
        safetensors.torch.save_file(tensors, tmp / "params.safetensors")
        torch.save(state, tmp / "state.pt")
        meta = {"stage": stage, "stage_index": stage_index, "step": step, "position": position}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            # Written by an earlier attempt that died before `latest` moved on: never the latest.
            assert latest_name(run_dir) != name, f"refusing to replace the latest checkpoint {name}"
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic_text(root / LATEST, name + "\n")
    _prune(root, keep=KEEP)
    logger.info("checkpoint %s", target)
    return target


def _prune(root: Path, keep: int) -> None:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    latest = (root / LATEST).read_text().strip()
    for name in names[:-keep]:
        if name != latest:
            shutil.rmtree(root / name, ignore_errors=True)


def latest_name(run_dir: Path) -> str | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def load_checkpoint(run_dir: Path, device: torch.device | str = "cpu") -> Checkpoint | None:
    """The newest complete checkpoint of ``run_dir``, or None when it has none."""
    name = latest_name(run_dir)
    if name is None:
        return None
    path = Path(run_dir) / CHECKPOINTS / name
    try:
        meta = json.loads((path / "trainer.json").read_text())
        params = safetensors.torch.load_file(path / "params.safetensors", device=str(device))
        state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path} is unreadable: {e}") from None
    return Checkpoint(path, meta["stage"], meta["step"], meta["position"], params, state)


def check_run_dir(
    run_dir: Path, config: TrainConfig, resume: bool, overwrite: bool = False
) -> None:
    """Refuse to start over an existing run or in a folder holding anything else (unless
    ``overwrite``), or to resume a run with a different config.

    Raises ``ValueError`` before anything is written."""
    run_dir = Path(run_dir)
    if not resume:
        if overwrite or not run_dir.exists():
            return
        if not run_dir.is_dir():
            raise ValueError(
                f"--out {run_dir} is a file, not a directory; choose another --out or pass "
                "--overwrite to replace it"
            )
        if (run_dir / CONFIG).is_file() or (run_dir / MODEL).exists():
            raise ValueError(
                f"{run_dir} already holds a training run; pass --resume to continue it, "
                "--overwrite to start over (deleting it), or choose another --out"
            )
        if any(run_dir.iterdir()):
            raise ValueError(
                f"--out {run_dir} is not empty and holds no training run; choose another "
                "--out or pass --overwrite to replace its contents"
            )
        return
    if overwrite:
        raise ValueError("--resume continues the run in --out; --overwrite would delete it")
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"nothing to resume in {run_dir}: it holds no training run")
    try:
        saved = TrainConfig.from_dict(json.loads((run_dir / CONFIG).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{run_dir / CONFIG} is unreadable: {e}") from None
    diffs = config.differences(saved)
    if diffs:
        listed = ", ".join(f"{k}={new!r} (saved: {old!r})" for k, (new, old) in diffs.items())
        raise ValueError(
            f"cannot resume {run_dir}: it was started with a different config: {listed}; "
            "resume with the same options, or choose another --out"
        )


def clear_run_dir(run_dir: Path) -> None:
    """Remove whatever ``run_dir`` holds (a file or a folder), for ``--overwrite``."""
    if run_dir.is_dir() and not run_dir.is_symlink():
        shutil.rmtree(run_dir)
    elif run_dir.exists() or run_dir.is_symlink():
        run_dir.unlink()
    logger.info("removed %s (--overwrite)", run_dir)


def write_config(run_dir: Path, config: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic_text(run_dir / CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl``; on resume, drops records past the checkpoint
    (written by the interrupted run after its last checkpoint), so the log reads as one run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS

    def truncate_after(self, order: tuple[int, int]) -> None:
        """Keep records at or before ``order = (stage index, step)``."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            if (record.get("stage_index", 0), record.get("step", 0)) <= order:
                kept.append(line)
        _write_atomic_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
