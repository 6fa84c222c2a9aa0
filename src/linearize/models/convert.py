"""Weight maps from transformers checkpoints to our decoder, and linearization of its layers.

Conversion is data: each family has a function mapping HF tensor names to ours, with strict key
and shape checks (every checkpoint tensor is used, every model tensor is filled).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from linearize.layers.attention import Attention, is_new_parameter
from linearize.layers.config import AttentionConfig, attention_config
from linearize.models.config import ModelConfig
from linearize.models.decoder import Decoder
from linearize.models.numerics import check_finite_weights
from linearize.models.quantize import QuantConfig, quantize

logger = logging.getLogger(__name__)


# Parameters a linearization adds; everything else is pretrained.
def _llama_map(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name.removeprefix("model."): tensor for name, tensor in hf.items()}


def _gpt2_map(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    # GPT-2 stores Conv1D weights as [in, out] and fuses q, k, v into c_attn.
    hf = {name.removeprefix("transformer."): t for name, t in hf.items()}
    D = config.hidden_size
    ours = {
        "embed_tokens.weight": hf.pop("wte.weight"),
        "embed_positions.weight": hf.pop("wpe.weight"),
        "norm.weight": hf.pop("ln_f.weight"),
        "norm.bias": hf.pop("ln_f.bias"),
    }
    hf.pop("lm_head.weight", None)
    for i in range(config.num_layers):
        p, o = f"h.{i}.", f"layers.{i}."
        for which in ("weight", "bias"):
            ours[o + f"input_layernorm.{which}"] = hf.pop(p + f"ln_1.{which}")
            ours[o + f"post_attention_layernorm.{which}"] = hf.pop(p + f"ln_2.{which}")
        qkv_w, qkv_b = hf.pop(p + "attn.c_attn.weight"), hf.pop(p + "attn.c_attn.bias")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            ours[o + f"self_attn.{name}.weight"] = qkv_w[:, j * D : (j + 1) * D].t()
            ours[o + f"self_attn.{name}.bias"] = qkv_b[j * D : (j + 1) * D]
        pairs = (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"))
        for src, dst in (*pairs, ("mlp.c_proj", "mlp.down_proj")):
            ours[o + dst + ".weight"] = hf.pop(p + src + ".weight").t()
            ours[o + dst + ".bias"] = hf.pop(p + src + ".bias")
        hf.pop(p + "attn.bias", None)
        hf.pop(p + "attn.masked_bias", None)
    ours.update(hf)  # leftovers surface as unexpected keys in the strict load
    return ours


def check_weights(model: Decoder, weights: dict[str, Tensor], source: str) -> None:
    """``weights`` fit ``model`` exactly (names, shapes) and are finite; ``model`` may be on the
    meta device, so a config's sizes are checked against the file before anything is allocated."""
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        # The head shares the embedding's tensors (quantized or not): they are stored once.
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    check_finite_weights(weights, source)


def load_weights(model: Decoder, weights: dict[str, Tensor], source: str) -> None:
    """Copy ``weights`` into ``model``, strictly: names and shapes must match exactly, and every
    value must be finite (a tensor holding NaN or inf is named)."""
    check_weights(model, weights, source)
    _copy(model, weights)


def _copy(model: Decoder, weights: dict[str, Tensor]) -> None:
    if model.config.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    model.load_state_dict(weights, strict=False)


def build_checked(
    config: ModelConfig,
    weights: dict[str, Tensor],
    source: str,
    quantization: QuantConfig | None = None,
) -> Decoder:
    """A :class:`Decoder` for ``config`` holding ``weights`` (quantized codes when
    ``quantization`` says so); the weights are checked against the config's shapes on the meta
    device first, so a crafted config allocates nothing."""
    with torch.device("meta"):
        skeleton = Decoder(config)
        if quantization is not None:
            quantize(skeleton, quantization, empty=True)
    check_weights(skeleton, weights, source)
    # Given memory without the random init the weights overwrite (1.1 s of SmolLM2's 2 s load).
    model = _materialized(skeleton)
    _copy(model, weights)
    return model


def _materialized(model: Decoder) -> Decoder:
    """``model``, built on the meta device, in CPU memory left for the weights (all of them
    checked present), with the buffers no weights file holds computed again by their modules'
    ``reset_buffers``."""
    computed = [
        module
        for module in model.modules()
        if any(module._buffers[name] is not None for name in module._non_persistent_buffers_set)
    ]
    missing = sorted({type(m).__name__ for m in computed if not hasattr(m, "reset_buffers")})
    if missing:  # (a new module's bug, not a user's: every attention is tested)
        raise TypeError(f"{missing} hold buffers no weights file has, without reset_buffers()")
    # to_empty gives each module a tensor of its own: a parameter shared by two (a tied head)
    # is shared again after.
    places: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                places.setdefault(id(parameter), []).append((module, name))
    model.to_empty(device="cpu")
    for (first, name), *others in places.values():
        for module, other in others:
            module._parameters[other] = first._parameters[name]
    for module in computed:
        module.reset_buffers()
    return model


def from_hf(hf_config: Any, hf_weights: dict[str, Tensor], source: str = "checkpoint") -> Decoder:
    """Our decoder (all layers softmax) holding a transformers checkpoint's weights."""
    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = Decoder(config)
    if config.architecture == "gpt2":
        weights = _gpt2_map(dict(hf_weights), config)
    else:
        weights = _llama_map(hf_weights)
    weights = {k: v.float() for k, v in weights.items()}
    # Checked on the meta model: a config's sizes must match the file before we allocate.
    check_weights(model, weights, source)
    model = _materialized(model)
    _copy(model, weights)
    return model


def linearize(
    model: Decoder,
    attention: str | AttentionConfig | dict[str, Any],
    layers: list[int] | None = None,
    *,
    keep_trained: bool = False,
) -> Decoder:
    """Replace the attention of ``layers`` (all by default) in place; return ``model``.

    Every pretrained weight is kept (q/k/v/o projections move over); new parameters get the
    method's initialisation (α = 0, conv taps = 0, identity feature maps). Layers not listed
    keep their attention, so hybrids are allowed. With ``keep_trained``, layers that already
    use this attention are left as they are, trained parameters and window included (a trained
    model trains on); an option asked for that differs from theirs is an error.
    """
    config = model.config
    if isinstance(attention, AttentionConfig):
        options = attention.to_dict()
    elif isinstance(attention, str):
        options = {"name": attention}
    else:
        options = dict(attention)
    name = options.get("name", "softmax")
    if not isinstance(attention, AttentionConfig):
        _check_options(options, list(config.attention_shapes()))
    indices = list(range(config.num_layers)) if layers is None else list(layers)
    for i in indices:
        if not isinstance(i, int) or not 0 <= i < config.num_layers:
            raise ValueError(f"layer index {i!r} out of range: this model has {config.num_layers}")
    probe = attention_config(name, **{k: v for k, v in options.items() if k != "name"})
    if not probe.is_causal:
        raise ValueError(
            f"attention {name!r} is not causal (it reads future tokens): it cannot be used in "
            "a decoder"
        )
    if keep_trained:
        kept = [i for i in indices if config.attention[i].get("name", "softmax") == name]
        for i in kept:
            _check_kept(config.attention_config(i), options, i)
        if kept:
            logger.info("layers %s already use %s: kept with their parameters", kept, name)
        indices = [i for i in indices if i not in kept]
    for i in indices:
        old = model.layers[i].self_attn
        config.attention[i] = options
        new = Attention(config.attention_config(i)).to(
            device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype
        )
        kept = {k: v for k, v in old.state_dict().items() if not is_new_parameter(k)}
        result = new.load_state_dict(kept, strict=False)
        if result.unexpected_keys or any(not is_new_parameter(k) for k in result.missing_keys):
            raise AssertionError(f"layer {i}: projections did not carry over: {result}")
        model.layers[i].self_attn = new
    if indices:
        logger.info("linearized layers %s with %s", indices, name)
    return model


def reconfigure(model: Decoder, options: dict[str, Any]) -> Decoder:
    """Set attention ``options`` on every linear layer of ``model``, in place, keeping every
    parameter (pretrained and trained): for options that add or reshape none, such as
    ``retain``, ``use_global``, ``decay`` or ``sinks`` (an ablation of a trained model, or its
    retained cache, without training again); returns ``model``. All layers or none: a layer
    that refuses leaves every layer as it was."""
    if "name" in options or "kind" in options:
        raise ValueError("reconfigure keeps each layer's attention: options 'name' and 'kind' "
                         "belong to linearize (--attention)")  # fmt: skip
    if model.quantization is not None:
        raise ValueError("set attention options on the fp model, then quantize it")
    _check_options(options, list(model.config.attention_shapes()))
    n = model.config.num_layers
    layers = [i for i in range(n) if model.config.attention_config(i).kind == "linear"]
    if not layers:
        raise ValueError("this model has no linear attention layer whose options could change")
    done = []
    try:
        for i in layers:
            done.append((i, *set_layer_options(model, i, options)))
    except ValueError:
        for i, module, previous in reversed(done):
            model.layers[i].self_attn, model.config.attention[i] = module, previous
        raise
    logger.info("set %s on layers %s", options, layers)
    return model


def set_layer_options(
    model: Decoder, i: int, options: dict[str, Any]
) -> tuple[Attention, dict[str, Any]]:
    """Layer ``i`` rebuilt with ``options`` over its own, the same parameters loaded into it, in
    place; returns the module and the options it replaced. Options that would add or reshape a
    parameter are a ``ValueError`` (and the layer is left as it was)."""
    old = model.layers[i].self_attn
    previous = model.config.attention[i]
    model.config.attention[i] = {**previous, **options}
    try:
        new = Attention(model.config.attention_config(i))
        new.load_state_dict(old.state_dict())
    except RuntimeError as error:  # the parameters do not fit
        model.config.attention[i] = previous
        raise ValueError(
            f"options {options} cannot be set on layer {i} of a converted model: they add or "
            f"reshape parameters, which needs linearize and training ({error})"
        ) from error
    except (TypeError, ValueError):  # not a valid attention
        model.config.attention[i] = previous
        raise
    new.to(device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype)
    new.train(old.training)
    model.layers[i].self_attn = new
    return old, previous


def _check_options(options: dict[str, Any], model_fields: list[str]) -> None:
    """No option may set what the model decides (its shapes) or the attention's name does."""
    for key in options:
        if key in model_fields:
            raise ValueError(
                f"option {key!r} is the model's own (it comes from its config, not the "
                f"attention's); options the attention takes exclude {model_fields}"
            )
        if key == "kind":
            raise ValueError(
                "option 'kind' comes with the attention's name (softmax, linear, ...): choose "
                "another attention instead"
            )


def _check_kept(current: AttentionConfig, options: dict[str, Any], layer: int) -> None:
    """A kept layer must already have every option asked for (a wide layer's window may be wider
    than the ``size`` asked for: see :mod:`linearize.models.wide`)."""
    for key, value in options.items():
        widened = key == "size" and current.window == "sliding" and current.size >= value
        if key != "name" and getattr(current, key) != value and not widened:
            raise ValueError(
                f"layer {layer} already uses {current.name} with {key}={getattr(current, key)!r}, "
                f"not {value!r}: linearizing it again would discard its trained parameters "
                "(start from the pretrained model to change it)"
            )
