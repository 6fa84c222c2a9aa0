"""The decoder's typed config, and how HF configs map onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from linearize.config import Config
from linearize.layers.config import AttentionConfig

Architecture = Literal["llama", "gpt2"]
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


@dataclass
class ModelConfig(Config):
    """A LLaMA-family (RMSNorm, RoPE, GQA, SwiGLU) or GPT-2-family (LayerNorm, learned positions,
    GELU MLP) decoder; ``attention`` holds one attention config per layer (hybrids allowed)."""

    keys_name = "model config keys"

    architecture: Architecture = "llama"
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.check_types()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        if not self.attention:
            self.attention = [{"name": "softmax"} for _ in range(self.num_layers)]

    def validate(self) -> ModelConfig:
        self.check_types()
        if self.architecture not in ("llama", "gpt2"):
            raise ValueError(f"architecture={self.architecture!r}; supported: llama, gpt2")
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
        for name in (*positive, "head_dim", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.attention) != self.num_layers:
            raise ValueError(
                f"{len(self.attention)} attention configs for {self.num_layers} layers"
            )
        for i in range(self.num_layers):
            try:
                self.attention_config(i)
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer {i}: {e}") from None
        return self

    def attention_config(self, layer: int) -> AttentionConfig:
        """Layer ``layer``'s attention config, with this model's shapes filled in."""
        from linearize.layers.config import ATTENTIONS

        options = dict(self.attention[layer])
        name = options.pop("name", "softmax")
        if not isinstance(name, str) or name not in ATTENTIONS:
            raise ValueError(
                f"layer {layer}: unknown attention {name!r}; valid: {list(ATTENTIONS)}"
            )
        shapes = self.attention_shapes()
        return AttentionConfig.from_dict({**ATTENTIONS[name], **options, **shapes, "name": name})

    def attention_shapes(self) -> dict[str, Any]:
        """The attention config fields this model decides (they override any option)."""
        return {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta if self.architecture == "llama" else None,
            "qkv_bias": self.qkv_bias,
            "o_bias": self.o_bias,
        }

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """From a transformers config of a supported family (all layers softmax)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "gpt2":
            return cls(
                architecture="gpt2",
                vocab_size=hf.vocab_size,
                hidden_size=hf.n_embd,
                num_layers=hf.n_layer,
                num_heads=hf.n_head,
                num_kv_heads=hf.n_head,
                intermediate_size=hf.n_inner or 4 * hf.n_embd,
                norm_eps=hf.layer_norm_epsilon,
                tie_embeddings=True,
                max_position_embeddings=hf.n_positions,
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                bos_token_id=hf.bos_token_id,
                eos_token_id=hf.eos_token_id,
            ).validate()
        scaling = getattr(hf, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope scaling {rope_type!r} is not supported yet (only default)")
        rope_params = getattr(hf, "rope_parameters", None) or {}
        theta = rope_params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        return cls(
            architecture="llama",
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            rope_theta=float(theta),
            norm_eps=hf.rms_norm_eps,
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            max_position_embeddings=hf.max_position_embeddings,
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            bos_token_id=hf.bos_token_id,
            eos_token_id=hf.eos_token_id,
        ).validate()
