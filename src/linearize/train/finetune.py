"""Stage 2, fine-tuning: next-token cross-entropy through LoRA adapters or on every weight.

The paper's recipe (method.md §6): LoRA r=8, α=16 on q, k, v, o, with the embeddings, the norms
and the linearization's new parameters trainable too. Adapters come from peft (``LoraModel``
injects them into our plain ``nn.Module`` decoder in place) and are merged into the projections
before saving, so a saved model loads without peft.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from linearize.models.convert import is_new_parameter
from linearize.models.decoder import Decoder, ModelState
from linearize.seeding import seeded
from linearize.train.losses import next_token_nll

if TYPE_CHECKING:  # (peft imports transformers' model classes: ~1.6 s, paid when LoRA is used)
    from peft.tuners.lora import LoraModel

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Modules trained in full next to the adapters (the paper's recipe).
LORA_FULL_MODULES = (nn.Embedding, nn.RMSNorm, nn.LayerNorm)


def add_lora(model: Decoder, r: int = 8, alpha: float = 16.0, seed: int | None = None) -> LoraModel:
    """Inject LoRA adapters (rank ``r``, scale ``alpha / r``, B = 0 so the model is unchanged)
    into every q/k/v/o projection of ``model``, in place; return peft's handle for merging.

    With a ``seed``, the adapters' random A matrices come from that seed alone (peft draws them
    on the CPU generator, which is restored afterwards), so a training run does not depend on
    what the process drew before; without one, from torch's global random state."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none"
    )
    if seed is None:
        return LoraModel(model, config, "default")
    with seeded(seed):
        return LoraModel(model, config, "default")


def merge_lora(handle: LoraModel) -> Decoder:
    """Fold the adapters into the projections and remove them: a plain model again."""
    model = handle.merge_and_unload(safe_merge=True)
    logger.info("merged LoRA adapters into the model")
    return model


def finetune_parameters(model: Decoder, lora: bool) -> dict[str, nn.Parameter]:
    """Mark what stage 2 trains and return it by name; everything else is frozen.

    Full fine-tuning trains every parameter. With LoRA: the adapters, the embeddings, the norms
    and the linearization's new parameters."""
    trainable: dict[str, nn.Parameter] = {}
    full = {
        f"{name}.{pname}" if name else pname
        for name, module in model.named_modules()
        if isinstance(module, LORA_FULL_MODULES)
        for pname, _ in module.named_parameters(recurse=False)
    }
    for name, p in model.named_parameters():
        train = not lora or "lora_" in name or name in full or is_new_parameter(name)
        p.requires_grad_(train and p.dtype.is_floating_point)
        if p.requires_grad:
            trainable[name] = p
    if lora and not any("lora_" in name for name in trainable):
        raise ValueError("no LoRA adapters in the model: call add_lora() first")
    return trainable


def finetune_loss(
    model: nn.Module,
    input_ids: Tensor,
    state: ModelState | None = None,
    *,
    denominator: float,
    form: str = "auto",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, dict[str, Tensor], ModelState]:
    """Next-token NLL of one micro-batch divided by the step's global number of predictions,
    and the state the micro-batch leaves (``state``: the one it continues, or None)."""
    with autocast():
        logits, new_state = model(input_ids, state=state, form=form)
    ce = next_token_nll(logits, input_ids) / denominator
    return ce, {"ce": ce}, new_state
