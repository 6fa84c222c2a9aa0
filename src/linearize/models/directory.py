"""Saving our own model directories, atomically.

A saved model directory holds ``config.json`` (format version, the architecture, and the full
attention config of every layer), ``model.safetensors`` and the tokenizer files; Medusa heads may
sit beside them (``medusa.*``, written and read by ``generation/medusa.py``). This module knows the
model only through its ``config``, ``state_dict`` and ``tokenizer``, so the decoder can use it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from linearize.paths import OutputError, atomic_dir, check_target

logger = logging.getLogger(__name__)

FORMAT = "linearize"
FORMAT_VERSION = 1
# The model_type of a directory written by `linearize export-hf` (its config.json holds ours too).
HF_MODEL_TYPE = "linearize"


def is_saved_model(directory: Path) -> bool:
    """True when ``directory`` holds a model saved by us (its config.json says so)."""
    try:
        meta = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


# A training run directory (``linearize train --out R``) keeps its model in ``R/model``.
RUN_MODEL = "model"


def check_output(
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Raise ``OutputError`` (a ``ValueError``) now, before any work, if :func:`save` would
    refuse ``directory``: a file, or a non-empty folder that is not one of our models; or, unless
    ``overwrite``, the model being read (``source``, a path or a built-in name): a quantized or
    converted copy saved there would replace its original."""
    if source is not None and not overwrite:
        check_not_source(directory, source, hint=" or pass --overwrite")
    return check_target(directory, overwrite=overwrite, replaceable=is_saved_model)


def check_not_source(
    directory: str | os.PathLike, source: str | os.PathLike, *, hint: str = ""
) -> None:
    """Raise ``OutputError`` if ``directory`` is the model being read: ``source`` (a path or a
    built-in name; a training run directory stands for its model)."""
    read = [Path(source), Path(source) / RUN_MODEL]
    if any(_same_file(directory, path) for path in read):
        raise OutputError(
            f"output {directory} is the model being read ({source}): saving there would replace "
            f"it; choose another path{hint}"
        )


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``directory`` atomically (a temp dir renamed into place); an existing
    ``directory`` is replaced only if empty or one of our models, unless ``overwrite``."""
    with atomic_dir(directory, overwrite=overwrite, replaceable=is_saved_model) as tmp:
        write_model(model, tmp, extra)
    logger.info("saved model to %s", directory)
    return Path(directory)


def write_model(model: nn.Module, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """``config.json``, ``model.safetensors`` and the tokenizer files into ``folder``."""
    config = model.config.to_dict()
    config["attention"] = [
        model.config.attention_config(i).to_dict() for i in range(model.config.num_layers)
    ]
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config}
    if model.quantization is not None:
        meta["quantization"] = model.quantization.to_dict()
    meta.update(extra or {})
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        # A tied head shares the embedding's tensors (quantized or not): stored once.
        if not (model.config.tie_embeddings and k.startswith("lm_head."))
    }
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
