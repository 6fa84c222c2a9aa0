"""``LinearizeForCausalLM``: our :class:`Decoder` behind transformers' ``PreTrainedModel`` and
``GenerationMixin``, so ``from_pretrained``, ``generate()``, pipelines and peft work on it.

The wrapped decoder computes everything (the logits are exactly ours); the cache carries our
per-layer state. A recurrent state cannot be rewound, so transformers' assisted decoding is
refused (``_is_stateful``, and ``_assisted_decoding`` itself for transformers past 5.24); beam
search reorders whole rows of the state, which is exact. Padding is refused too: a pad token
would enter the recurrent state.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from linearize.hf.cache import LinearizeCache
from linearize.hf.configuration_linearize import LinearizeConfig
from linearize.layers.rope import RotaryEmbedding
from linearize.models.decoder import Decoder
from linearize.models.quantize import dequantized_state_dict

# transformers 5 calls the cache ``cache``; 4.x called it ``past_key_values``.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)

REMOTE_CODE = {
    "configuration_linearize.py": (
        '"""A linearized model\'s config: the class lives in the `linearize` package."""\n\n'
        "from linearize.hf import LinearizeConfig  # noqa: F401\n"
    ),
    "modeling_linearize.py": (
        '"""A linearized model: the classes live in the `linearize` package."""\n\n'
        "from linearize.hf import (  # noqa: F401\n"
        "    LinearizeCache,\n"
        "    LinearizeConfig,\n"
        "    LinearizeForCausalLM,\n"
        ")\n"
    ),
}


def write_remote_code(directory: str | os.PathLike) -> None:
    """The Python files ``config.json``'s ``auto_map`` names (``trust_remote_code=True``)."""
    for name, text in REMOTE_CODE.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


class LinearizeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LinearizeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearizeConfig) -> None:
        super().__init__(config)
        self.model = Decoder(config.model_config())
        self.post_init()

    def _assisted_decoding(self, *args: Any, **kwargs: Any):
        # transformers refuses assisted generation for ``_is_stateful`` models up to 5.24;
        # 5.25 comes here and fails on a missing cache: refuse it with the reason, everywhere.
        raise ValueError(
            "assisted generation is not supported with stateful models, such as "
            f"{type(self).__name__}: its recurrent state cannot be rewound to an accepted "
            "prefix; linearize's own speculative decoding is exact on it "
            "(linearize generate --speculative lookup|draft|medusa)"
        )

    @classmethod
    def from_decoder(cls, decoder: Decoder) -> LinearizeForCausalLM:
        """A transformers model holding a copy of ``decoder``'s weights (int8 / int4 weights
        dequantized to float32: transformers cannot read our codes)."""
        config = LinearizeConfig(model=decoder.config.to_dict())
        model = cls(config).to(dtype=decoder.dtype)
        model.model.load_state_dict(dequantized_state_dict(decoder), strict=True)
        return model.to(decoder.device).eval()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our forward creates its own LinearizeCache; a DynamicCache would hold KV pairs.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """What transformers calls for tensors a checkpoint does not hold (and new models)."""
        if isinstance(module, nn.Linear | nn.Embedding):
            Decoder._init_weights(module)
        elif isinstance(module, nn.RMSNorm | nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            # A non-persistent buffer: rebuilt, never read from the checkpoint.
            fresh = RotaryEmbedding(module.inv_freq.shape[0] * 2, self._rope_theta())
            module.inv_freq.copy_(fresh.inv_freq)

    def _rope_theta(self) -> float:
        return self.model.config.rope_theta

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """transformers' save, plus the remote-code files (``auto_map`` is in every config)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: LinearizeCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``input_ids: [B, T]`` continue ``cache`` (``None`` starts the sequences)."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if inputs_embeds is not None or input_ids is None:
            raise ValueError(
                "LinearizeForCausalLM takes input_ids (inputs_embeds is not supported)"
            )
        _check_no_padding(attention_mask)
        if cache is not None and not isinstance(cache, LinearizeCache):
            if cache.get_seq_length() != 0:
                name = type(cache).__name__
                raise TypeError(f"a linearized model continues only a LinearizeCache, got {name}")
            cache = None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = None if cache is None else cache.state
        if logits_to_keep == 1 and labels is None and not torch.is_grad_enabled():
            # generate()'s prefill: in segments, only the last position kept (flat memory).
            last, state = self.model.prefill(input_ids, state=state)
            hidden = last[:, None]
        else:
            hidden, state = self.model.forward_hidden(input_ids, state=state)
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
        logits = self.model.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        if use_cache:
            cache = cache if cache is not None else LinearizeCache()
            cache.state = state
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None}
        )


def _check_no_padding(attention_mask: Tensor | None) -> None:
    if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
        raise ValueError(
            "padding is not supported: a padded position would enter the recurrent state. "
            "Give sequences of equal length (or one at a time) with no attention_mask zeros"
        )
