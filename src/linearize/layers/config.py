"""The attention registry: every attention is a named preset of one typed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from linearize.config import Config
from linearize.layers.feature_maps import FEATURE_MAPS
from linearize.ops import linear_attn

Kind = Literal["softmax", "linear", "linformer"]
Form = Literal["auto", "parallel", "chunk", "recurrent"]
FORMS = ("auto", "parallel", "chunk", "recurrent")


@dataclass
class AttentionConfig(Config):
    """Everything that defines one attention layer; saved with every converted model."""

    keys_name = "attention options"

    name: str = "softmax"
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    rope_theta: float | None = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    kind: Kind = "softmax"
    local: Literal["none", "softmax", "relu2"] = "none"
    window: Literal["group", "sliding"] = "sliding"
    size: int = 0
    sinks: int = 0
    use_global: bool = True
    feature_map: str = "elu"
    feature_dim: int | None = None
    normalize: bool = True
    # "sum": local + α·global (the paper); "shared": one denominator for both (LoLCATs).
    combine: Literal["sum", "shared"] = "sum"
    # Global token σ weighs decay^(τ−σ) for query τ: the global mass stays bounded in length.
    decay: float = 1.0
    # Tokens per key head kept exactly past the window, those that drew the most attention
    # inside it (ops/retain.py): a fixed-size cache of far tokens, one softmax with the window.
    retain: int = 0
    # Their attention halves every this many tokens of age when ranked (0: never): the cache
    # follows the text instead of keeping its beginning's strongest tokens.
    retain_halflife: float = 0.0
    # Sink keys seen from the query's position inside the kept cache (StreamingLLM) or from
    # its absolute position (past the trained range on long sequences).
    sink_positions: Literal["cache", "absolute"] = "cache"
    # The global feature map reads q, k after RoPE (the paper) or before (no positions: the
    # same kernel at every length).
    global_rope: bool = True
    output_norm: bool = False
    conv: Literal["none", "causal", "symmetric"] = "none"
    conv_size: int = 32
    alpha: float = 1.0
    learn_alpha: bool = False
    chunk_size: int = 64
    max_length: int = 4096
    landmarks: int = 64

    def __post_init__(self) -> None:
        self.check_types()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)

    def validate(self) -> AttentionConfig:
        self.check_types()
        positive = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(
                f"feature_dim must be >= 1 (or None: the map's own), got {self.feature_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.kind not in ("softmax", "linear", "linformer"):
            raise ValueError(f"kind={self.kind!r}; allowed: softmax, linear, linformer")
        if self.kind == "linear":
            self.linear_spec()  # the op validates its window, local part, sizes and retain
        elif self.retain:
            raise ValueError(
                f"retain={self.retain} needs a linear attention, got kind={self.kind!r}"
            )
        if self.conv != "none" and self.conv_size < 1:
            raise ValueError(f"conv_size (causal taps) must be >= 1, got {self.conv_size}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"unknown feature_map {self.feature_map!r}; valid: {sorted(FEATURE_MAPS)}"
            )
        if self.kind == "linear" and self.local == "none" and not self.use_global:
            raise ValueError("this attention would attend to nothing: enable local or global")
        if self.combine not in ("sum", "shared"):
            raise ValueError(f"combine={self.combine!r}; allowed: sum, shared")
        if self.combine == "shared" and (self.local != "softmax" or self.feature_map in _SIGNED):
            raise ValueError(
                "combine='shared' needs local='softmax' and a positive feature map "
                f"(not {sorted(_SIGNED)}), got local={self.local!r}, "
                f"feature_map={self.feature_map!r}"
            )
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.sink_positions not in ("cache", "absolute"):
            raise ValueError(f"sink_positions={self.sink_positions!r}; allowed: cache, absolute")
        if self.kind == "linformer" and (self.landmarks < 1 or self.max_length < 1):
            raise ValueError("linformer needs landmarks >= 1 and max_length >= 1")
        return self

    def linear_spec(self) -> linear_attn.LinearAttnSpec:
        """The op's description of a linear attention layer (the one place it is built)."""
        return linear_attn.LinearAttnSpec(
            local=self.local,
            window=self.window,
            size=self.size,
            sinks=self.sinks,
            use_global=self.use_global,
            normalize=self.normalize,
            combine=self.combine,
            decay=self.decay,
            retain=self.retain,
            retain_halflife=self.retain_halflife,
        )

    @property
    def is_causal(self) -> bool:
        return self.kind != "linformer" and self.conv != "symmetric"


# Feature maps whose kernel φ(q)·φ(k) can be negative: no shared denominator with them.
_SIGNED = ("unit",)

_LINEAR = {"kind": "linear", "window": "sliding", "size": 0, "local": "none"}
_FLASH = {"kind": "linear", "window": "group", "size": 64}

ATTENTIONS: dict[str, dict[str, Any]] = {
    "softmax": {"kind": "softmax"},
    "sliding_window": {
        "kind": "linear",
        "local": "softmax",
        "window": "sliding",
        "size": 64,
        "sinks": 4,
        "use_global": False,
    },
    "linformer": {"kind": "linformer"},
    "relu": {**_LINEAR, "feature_map": "relu"},
    "elu": {**_LINEAR, "feature_map": "elu"},
    "performer": {**_LINEAR, "feature_map": "performer"},
    "transnormer": {**_LINEAR, "feature_map": "elu", "normalize": False, "output_norm": True},
    "yoso": {**_LINEAR, "feature_map": "yoso"},
    "hedgehog": {**_LINEAR, "feature_map": "hedgehog"},
    "t2r": {**_LINEAR, "feature_map": "t2r"},
    "flash_local": {**_FLASH, "local": "relu2", "use_global": False},
    "flash_global": {**_FLASH, "local": "none", "feature_map": "unit", "normalize": False},
    # The paper's augmented layer with LoLCATs' local part (method.md §3): a sliding window of
    # 512 tokens plus 4 attention sinks instead of fixed groups of 64, and a global part that is
    # stable in length (docs/forms.md §1b): a learned Hedgehog map on q, k before RoPE, one
    # denominator shared with the window, a decay of 1 - 1/1024, sinks at cache positions.
    # α = 0 and zero taps: converted, it is the window alone. 512 rather than 256 tokens: with
    # the wide layers (models/wide.py), the narrow windows decide how far back a number is
    # found (SmolLM2, passkey at 8,000 tokens, untrained: 5/10 with 256, 8/10 with 512; trained
    # by the default recipe: 9/10, like the original; docs/results.md). The paper's grouped
    # layer: window="group", size=64, sinks=0. A retained cache (ops/retain.py, forms §1c) keeps
    # 32 exact tokens per key head past the window, those that drew the most attention inside
    # it, halved per 512 tokens of age: the part past the window that helps (docs/results.md,
    # "The retained cache, built": −0.8 % perplexity over P&P's first 16k, trained or not).
    "augmented": {
        "kind": "linear",
        "window": "sliding",
        "size": 512,
        "sinks": 4,
        "local": "softmax",
        "feature_map": "hedgehog",
        "combine": "shared",
        "decay": 1 - 1 / 1024,
        "global_rope": False,
        "conv": "none",
        "conv_size": 32,
        "alpha": 0.0,
        "learn_alpha": True,
        "retain": 32,
        "retain_halflife": 512.0,
    },
    # The paper's global term: identity map on q̂, k̂ after RoPE, unnormalised, added to the
    # window's output. NOT length-stable: its sum grows with the folded tokens, so α fitted on
    # short blocks swamps the window on long texts (issue 12: ppl in the millions past 16k).
    "augmented_paper": {
        "kind": "linear",
        "window": "sliding",
        "size": 256,
        "sinks": 4,
        "local": "softmax",
        "feature_map": "unit",
        "normalize": False,
        "conv": "causal",
        "conv_size": 32,
        "alpha": 0.0,
        "learn_alpha": True,
    },
}

# The paper's ablations of the augmented layer, as option sets.
ABLATIONS: dict[str, dict[str, Any]] = {
    "local": {"use_global": False, "retain": 0, "conv": "none"},
    "local+global": {"use_global": True, "conv": "none"},
    "local+conv": {"use_global": False, "conv": "causal"},
    "full": {"use_global": True, "conv": "causal"},
}


def list_attentions() -> list[str]:
    """Names accepted by :func:`attention_config` and ``--attention``."""
    return list(ATTENTIONS)


def attention_config(name: str, **options: Any) -> AttentionConfig:
    """The registry preset ``name`` with ``options`` overriding its defaults, validated."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; valid: {list_attentions()}")
    return AttentionConfig.from_dict({**ATTENTIONS[name], **options, "name": name})
