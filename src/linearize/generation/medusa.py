"""Medusa heads (method.md §5): M extra next-next-token predictors on the last hidden state.

Head ``m`` (0-based) reads the final normed hidden state ``h_t`` and predicts token ``t + m + 2``
(the LM head itself predicts ``t + 1``). Each head is a residual block ``h + SiLU(W h + b)`` with
``W, b`` zero-initialised, followed by a vocabulary projection initialised from a copy of the LM
head (or, with ``shared_proj``, the frozen LM head itself): a fresh head is the LM head. The
heads are M separately constructed modules.

Saved beside the model as ``medusa.safetensors`` + ``medusa.json`` (config, per-head accuracies
measured after training, training facts); :func:`load_heads` returns ``None`` when a directory
has no heads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.config import Config
from linearize.models.decoder import Decoder
from linearize.models.directory import is_saved_model, write_model
from linearize.models.numerics import check_finite_weights
from linearize.paths import atomic_dir, atomic_write

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "medusa.safetensors"
CONFIG_FILE = "medusa.json"
FORMAT = "linearize-medusa"
FORMAT_VERSION = 1


@dataclass
class MedusaConfig(Config):
    """Shapes of a set of Medusa heads."""

    keys_name = "Medusa config keys"

    num_heads: int = 4
    hidden_size: int = 64
    vocab_size: int = 128
    num_blocks: int = 1
    shared_proj: bool = False

    def validate(self) -> MedusaConfig:
        for name in ("num_heads", "hidden_size", "vocab_size", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"Medusa {name} must be >= 1, got {getattr(self, name)}")
        return self


class ResidualBlock(nn.Module):
    """``h + SiLU(W h + b)``; zero ``W, b`` make it the identity at initialisation."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + F.silu(self.linear(h))


class MedusaHead(nn.Module):
    """Residual block(s), then the head's own vocabulary projection (``None`` when shared)."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(ResidualBlock(config.hidden_size) for _ in range(config.num_blocks))
        )
        self.proj = None
        if not config.shared_proj:
            self.proj = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MedusaHeads(nn.Module):
    """``heads(h: [..., D], lm_head) -> logits [M, ..., V]``.

    With ``shared_proj`` the heads have residual blocks only and project with the model's own
    (frozen) LM head, passed at call time: all M heads then cost one matrix product over the
    vocabulary instead of M, which matters on a CPU where each product reads the whole
    ``[V, D]`` matrix from memory (SmolLM2: 113 MB per head per token). Otherwise each head owns
    a trainable copy of the LM head, as in Medusa.

    ``rank_accuracy[m][i]``: measured probability that head ``m``'s ``i``-th ranked token is the
    base model's next-but-``m`` token (``None`` until measured); it drives the tree choice.
    """

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config = config.validate()
        self.heads = nn.ModuleList(MedusaHead(config) for _ in range(config.num_heads))
        self.rank_accuracy: list[list[float]] | None = None
        self.metrics: dict[str, Any] = {}
        # A quantized LM head's weight, dequantized once (see _shared).
        self._dequantized: tuple[nn.Module, Tensor] | None = None

    @classmethod
    def from_model(
        cls, model: nn.Module, num_heads: int = 4, num_blocks: int = 1, shared_proj: bool = False
    ) -> MedusaHeads:
        """Fresh heads for ``model``: zero residual blocks; projections copied from its LM head
        (or shared with it)."""
        weight = model.lm_head.weight
        config = MedusaConfig(num_heads, weight.shape[1], weight.shape[0], num_blocks, shared_proj)
        heads = cls(config).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for head in heads.heads:
                if head.proj is not None:
                    head.proj.weight.copy_(weight)
        return heads

    def __len__(self) -> int:
        return len(self.heads)

    def residuals(self, h: Tensor, count: int | None = None) -> Tensor:
        """The first ``count`` (default: all) heads' residual-block outputs ``[M, ..., D]``."""
        return torch.stack([head.blocks(h) for head in self.heads[:count]])

    def project(self, m: int, r: Tensor, lm_head: nn.Module | None = None) -> Tensor:
        """Head ``m``'s logits from its residual output ``r``."""
        proj = self.heads[m].proj
        return proj(r) if proj is not None else F.linear(r, self._shared(lm_head))

    def forward(
        self, h: Tensor, lm_head: nn.Module | None = None, count: int | None = None
    ) -> Tensor:
        """Logits of the first ``count`` heads (default: all)."""
        r = self.residuals(h, count)
        if self.config.shared_proj:
            return F.linear(r, self._shared(lm_head))
        return torch.stack([self.heads[m].proj(r[m]) for m in range(r.shape[0])])

    def _shared(self, lm_head: nn.Module | None) -> Tensor:
        if lm_head is None:
            raise ValueError("these Medusa heads share the model's LM head: pass lm_head")
        qweight = getattr(lm_head, "qweight", None)
        if qweight is None:
            # Frozen: gradients reach the residual blocks only.
            return lm_head.weight.detach()
        # A quantized head dequantizes its whole weight on every read (SmolLM2's: 49,152 × 576,
        # 113 MB in fp32, tens of ms): once per head object here, the same numbers.
        if self._dequantized is None or self._dequantized[0] is not qweight:
            self._dequantized = (qweight, qweight.dequantize().detach())
        return self._dequantized[1]

    def check_model(self, model: nn.Module) -> None:
        """Raise unless these heads fit ``model``'s hidden size and vocabulary."""
        D, V = model.config.hidden_size, model.config.vocab_size
        if (self.config.hidden_size, self.config.vocab_size) != (D, V):
            raise ValueError(
                f"Medusa heads were built for hidden size {self.config.hidden_size} and "
                f"vocabulary {self.config.vocab_size}; this model has {D} and {V}"
            )


def save_heads(heads: MedusaHeads, directory: str | os.PathLike) -> Path:
    """Write ``medusa.safetensors`` and ``medusa.json`` into ``directory`` (each atomically;
    the JSON last, so a directory with the JSON always has matching weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": asdict(heads.config),
        "rank_accuracy": heads.rank_accuracy,
        "metrics": heads.metrics,
    }
    atomic_write(
        directory / WEIGHTS_FILE,
        lambda p: safetensors.torch.save_file(tensors, p, metadata={"format": "pt"}),
    )
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    logger.info("saved %d Medusa heads to %s", len(heads), directory)
    return directory


def save_with_heads(
    model: Decoder, heads: MedusaHeads, directory: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """The model and its heads into ``directory`` together, atomically (a model directory that
    also holds ``medusa.safetensors`` and ``medusa.json``); like ``Decoder.save``, a directory
    that is not one of our models is refused unless ``overwrite``."""
    with atomic_dir(directory, overwrite=overwrite, replaceable=is_saved_model) as tmp:
        write_model(model, tmp)
        save_heads(heads, tmp)
    logger.info("saved the model and %d Medusa heads to %s", len(heads), directory)
    return Path(directory)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not Medusa heads of format {FORMAT!r} version {FORMAT_VERSION} "
            f"(found {meta.get('format')!r} version {meta.get('format_version')!r})"
        )
    return meta


def load_heads(directory: str | os.PathLike) -> MedusaHeads | None:
    """The heads saved in ``directory``, or ``None`` if it holds none."""
    directory = Path(directory)
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not directory.is_dir() or not (weights.exists() or config.exists()):
        return None
    if not (weights.exists() and config.exists()):
        missing = config if weights.exists() else weights
        raise ValueError(f"{directory}: incomplete Medusa heads, {missing.name} is missing")
    meta = _read_meta(config)
    heads = MedusaHeads(MedusaConfig.from_dict(meta["config"]))
    try:
        tensors = safetensors.torch.load_file(weights)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights}: corrupted or truncated safetensors file ({e})") from None
    check_finite_weights(tensors, str(weights))
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        heads.to(dtype=dtypes.pop())
    result = heads.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not match {config.name}: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )
    heads.rank_accuracy = meta.get("rank_accuracy")
    heads.metrics = meta.get("metrics") or {}
    return heads
