"""Stage 1, attention transfer (LoLCATs; method.md §6).

The base model is frozen; only the parameters the linearization added train (feature maps, conv
taps, α), so that each linearized layer's output matches the softmax layer's output **on the same
input**. Teacher-forced and layer-wise: the softmax teacher runs once per batch without
gradients, its per-layer attention inputs and outputs are captured, then every linearized
attention is run on its layer's teacher input and the summed MSE against the teacher output is
backpropagated through that attention alone (no full-model backward).

The teacher is a :class:`Decoder` that **shares** every module of the student except the
attention computation: its softmax attentions hold the student's own q/k/v/o projections, so it
costs no extra memory for weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from linearize.models.convert import is_new_parameter
from linearize.models.decoder import Decoder
from linearize.train.losses import attention_mse, next_token_nll

logger = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED_LAYER_MODULES = ("input_layernorm", "post_attention_layernorm", "mlp")


def linearized_layers(model: Decoder) -> list[int]:
    """Indices of the layers whose attention is not softmax."""
    return [i for i, layer in enumerate(model.layers) if layer.self_attn.config.kind != "softmax"]


def transfer_parameters(model: Decoder) -> dict[str, nn.Parameter]:
    """The parameters stage 1 trains: those the linearization added, in the linearized layers.

    Raises ``ValueError`` when there are none (a plain or softmax-local attention)."""
    names = set(model.attention_names())
    params = {
        name: p
        for name, p in model.named_parameters()
        if is_new_parameter(name) and p.dtype.is_floating_point
    }
    if not linearized_layers(model):
        raise ValueError(
            "the model has no linearized layer: the transfer stage needs a linear attention "
            "(pass --attention)"
        )
    if not params:
        raise ValueError(
            f"attention {sorted(names)} has no trainable new parameters (no feature map, "
            "conv taps or alpha): the transfer stage has nothing to train; use --stage finetune"
        )
    return params


def windows_cover(model: Decoder, block_size: int) -> bool:
    """Whether every linearized layer attends exactly (softmax window + sinks) over a whole
    block of ``block_size`` tokens: it then equals its teacher on every training block, and
    attention transfer has nothing to learn."""
    for i in linearized_layers(model):
        config = model.config.attention_config(i)
        if not (config.local == "softmax" and config.window == "sliding"):
            return False
        if config.size + config.sinks < block_size:
            return False
    return True


def build_teacher(model: Decoder) -> Decoder:
    """A softmax-attention :class:`Decoder` that shares every module of ``model`` (embeddings,
    norms, MLPs, LM head, the q/k/v/o projections and RoPE): no weight is copied."""
    config = dataclasses.replace(
        model.config, attention=[{"name": "softmax"} for _ in range(model.config.num_layers)]
    )
    with torch.device("meta"):
        teacher = Decoder(config)
    teacher.embed_tokens = model.embed_tokens
    if hasattr(model, "embed_positions"):
        teacher.embed_positions = model.embed_positions
    teacher.norm, teacher.lm_head = model.norm, model.lm_head
    for ours, theirs in zip(teacher.layers, model.layers, strict=True):
        for name in SHARED_LAYER_MODULES:
            setattr(ours, name, getattr(theirs, name))
        if theirs.self_attn.config.kind == "softmax":
            ours.self_attn = theirs.self_attn
            continue
        for name in PROJECTIONS:
            setattr(ours.self_attn, name, getattr(theirs.self_attn, name))
        ours.self_attn.rope = theirs.self_attn.rope
    left = [n for n, t in [*teacher.named_parameters(), *teacher.named_buffers()] if t.is_meta]
    assert not left, f"teacher tensors not shared with the student: {left}"
    return teacher


@torch.no_grad()
def teacher_activations(
    teacher: Decoder, input_ids: Tensor, layers: list[int]
) -> dict[int, tuple[Tensor, Tensor]]:
    """``{layer: (attention input, attention output)}``, both ``[B, T, D]``, from one forward
    pass of the softmax teacher (the inputs every layer sees in the teacher's own forward)."""
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def capture(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            captured[index] = (args[0].detach(), output[0].detach())

        return hook

    hooks = [teacher.layers[i].self_attn.register_forward_hook(capture(i)) for i in layers]
    try:
        teacher.forward_hidden(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _layer_mse(attention: nn.Module, x: Tensor, y: Tensor, form: str) -> Tensor:
    return attention_mse(attention(x, form=form)[0], y)


def transfer_loss(
    model: Decoder,
    teacher: Decoder,
    input_ids: Tensor,
    *,
    mse_weight: float,
    ce_weight: float,
    mse_denominator: float,
    ce_denominator: float,
    form: str = "auto",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage-1 loss of one micro-batch and its parts, each summed and divided by the step's
    global count (so micro-batches and processes add up to the step's mean).

    ``mse``: squared error of every linearized layer's output against the teacher's, summed over
    layers, divided by ``mse_denominator`` (tokens × hidden size in the global batch: each layer
    contributes its mean squared error). ``ce``: next-token NLL of the student's own full
    forward, divided by ``ce_denominator`` (predictions in the global batch)."""
    parts: dict[str, Tensor] = {}
    if mse_weight:
        with autocast():
            acts = teacher_activations(teacher, input_ids, linearized_layers(model))
            # Each layer's graph is recomputed in backward instead of kept: on long blocks the
            # graphs of all layers at once would dominate memory (O(layers · T · window)).
            mse = sum(
                checkpoint(_layer_mse, model.layers[i].self_attn, x, y, form, use_reentrant=False)
                for i, (x, y) in acts.items()
            )
        parts["mse"] = mse / mse_denominator
    if ce_weight:
        with autocast():
            logits, _ = model(input_ids, form=form)
        parts["ce"] = next_token_nll(logits, input_ids) / ce_denominator
    weights = {"mse": mse_weight, "ce": ce_weight}
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts
