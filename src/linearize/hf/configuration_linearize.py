"""The transformers config of a linearized model (``model_type = "linearize"``).

Its ``config.json`` is also a saved linearize directory's: ``format``, ``format_version`` and
``model`` (our :class:`ModelConfig`, every layer's attention spelled out) are the source of
truth; the standard transformers names (``vocab_size``, ``num_hidden_layers``, ...) are derived
from them, for the code in transformers, peft and lm-eval that reads them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from linearize.models.config import ModelConfig
from linearize.models.directory import FORMAT, FORMAT_VERSION, HF_MODEL_TYPE

MODEL_TYPE = HF_MODEL_TYPE
# What the exported directory's Python files are called, and the classes they hold.
AUTO_MAP = {
    "AutoConfig": "configuration_linearize.LinearizeConfig",
    "AutoModelForCausalLM": "modeling_linearize.LinearizeForCausalLM",
}
# transformers' names, derived from ``model``; never read back from config.json.
_DERIVED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "attention_types",
)


class LinearizeConfig(PretrainedConfig):
    """``LinearizeConfig(model=ModelConfig(...).to_dict())``; ``model_config()`` gives it back."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict[str, Any] | None = None, **kwargs: Any) -> None:
        fmt = kwargs.pop("format", FORMAT)
        version = kwargs.pop("format_version", FORMAT_VERSION)
        if fmt != FORMAT or version != FORMAT_VERSION:
            raise ValueError(
                f"config format {fmt!r} version {version!r} is not supported "
                f"(this is {FORMAT!r} version {FORMAT_VERSION})"
            )
        config = ModelConfig.from_dict(dict(model or {}))
        for name in _DERIVED:
            kwargs.pop(name, None)
        kwargs.setdefault("tie_word_embeddings", config.tie_embeddings)
        kwargs.setdefault("bos_token_id", config.bos_token_id)
        kwargs.setdefault("eos_token_id", config.eos_token_id)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        self.use_cache = kwargs.pop("use_cache", True)
        self.format = FORMAT
        self.format_version = FORMAT_VERSION
        self.model = _full_dict(config)
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_layers
        self.num_attention_heads = config.num_heads
        self.num_key_value_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.intermediate_size = config.intermediate_size
        self.max_position_embeddings = config.max_position_embeddings
        self.attention_types = [layer["name"] for layer in self.model["attention"]]
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(dict(self.model))


def _full_dict(config: ModelConfig) -> dict[str, Any]:
    """The config with every layer's attention options written out (as ``models.io.save`` does)."""
    data = config.to_dict()
    data["attention"] = [config.attention_config(i).to_dict() for i in range(config.num_layers)]
    return data
