"""What each stage trains and how: a registry of stage set-ups used by the one trainer loop.

A set-up freezes and unfreezes parameters, adds adapters where the stage wants them, and binds
the stage's loss and its AdamW parameter groups. A loss takes one micro-batch ``[b, T]`` and the
state it continues (None: a fresh start) and returns the loss, already divided by the step's
global counts, its parts, and the state the micro-batch leaves (None where the stage does not
carry one).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from linearize.models.convert import is_new_parameter
from linearize.models.decoder import Decoder, ModelState
from linearize.train.config import TrainConfig
from linearize.train.finetune import add_lora, finetune_loss, finetune_parameters
from linearize.train.transfer import build_teacher, transfer_loss, transfer_parameters

LossFn = Callable[[Tensor, ModelState | None], tuple[Tensor, dict[str, Tensor], ModelState | None]]
Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclass
class StageSetup:
    """One stage: its name and steps, the trained parameters by name, AdamW groups, the loss,
    peft's handle when LoRA adapters were added (merged at the end of the stage), and whether
    it reads the text in order, carrying each sequence's state into its next block."""

    name: str
    steps: int
    params: dict[str, nn.Parameter]
    groups: list[dict[str, Any]]
    loss: LossFn
    lora: Any = None
    carry_state: bool = False


def setup_transfer(
    model: Decoder, config: TrainConfig, autocast: Autocast, prepare: Callable
) -> StageSetup:
    """Stage 1: only the linearization's new parameters train, against the softmax teacher.

    Runs replicated (its layer-wise loss calls attention modules directly), so ``prepare`` is
    not used."""
    model.requires_grad_(False)
    params = transfer_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    tokens = config.batch_size * config.block_size
    parts = functools.partial(
        transfer_loss,
        model,
        build_teacher(model),
        mse_weight=config.mse_weight,
        ce_weight=config.ce_weight,
        mse_denominator=tokens * model.config.hidden_size,
        ce_denominator=config.batch_size * (config.block_size - 1),
        form=config.form,
        autocast=autocast,
    )

    def loss(input_ids: Tensor, state: ModelState | None) -> tuple[Tensor, dict, None]:
        if state is not None:
            raise ValueError("the transfer stage reads independent blocks; it carries no state")
        return *parts(input_ids), None

    groups = [{"params": list(params.values()), "lr": config.transfer_lr, "weight_decay": 0.0}]
    return StageSetup("transfer", config.stage_steps()["transfer"], params, groups, loss)


def setup_finetune(
    model: Decoder, config: TrainConfig, autocast: Autocast, prepare: Callable
) -> StageSetup:
    """Stage 2: next-token cross-entropy through LoRA adapters or on every weight.

    ``prepare(model, params) -> params`` lets the distributed strategy wrap the model (FSDP
    shards it; its parameters are then new objects)."""
    lora = add_lora(model, config.lora_r, config.lora_alpha, config.seed) if config.lora else None
    params = prepare(model, finetune_parameters(model, lora=config.lora))
    loss = functools.partial(
        finetune_loss,
        model,
        denominator=config.batch_size * (config.block_size - 1),
        form=config.form,
        autocast=autocast,
    )
    return StageSetup(
        "finetune",
        config.stage_steps()["finetune"],
        params,
        param_groups(params, config),
        loss,
        lora,
        carry_state=config.carry_state,
    )


def param_groups(params: dict[str, nn.Parameter], config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: the new parameters at ``new_lr`` (default ``lr``); weight decay on
    matrices only."""
    new = [p for n, p in params.items() if is_new_parameter(n)]
    decay = [p for n, p in params.items() if not is_new_parameter(n) and p.dim() >= 2]
    rest = [p for n, p in params.items() if not is_new_parameter(n) and p.dim() < 2]
    groups = [
        {"params": new, "lr": config.new_lr or config.lr, "weight_decay": 0.0},
        {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": rest, "lr": config.lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


STAGE_SETUPS: dict[str, Callable[..., StageSetup]] = {
    "transfer": setup_transfer,
    "finetune": setup_finetune,
}
