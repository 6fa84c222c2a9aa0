"""The training config: one typed dataclass; the ``linearize train`` flags derive from it.

A run has up to two stages. **transfer** (attention transfer, LoLCATs): the base model frozen,
only the parameters the linearization added train, so that every linearized layer's output
matches the softmax layer's output on the same input. **finetune**: next-token cross-entropy,
through LoRA adapters (``lora=True``, the paper's recipe) or on every weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from linearize.config import Config, option
from linearize.layers.config import attention_config
from linearize.models.wide import DEFAULT_WIDE_SIZE

Stage = Literal["transfer", "finetune", "both"]
STAGES = ("transfer", "finetune", "both")
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
TrainForm = Literal["auto", "parallel", "chunk"]
TRAIN_FORMS = ("auto", "parallel", "chunk")
Parallel = Literal["ddp", "fsdp"]
PARALLELS = ("ddp", "fsdp")
# Fields that may change between an interrupted run and its resumption: they do not change
# what the run computes (where it runs, how often it reports, what it keeps for backward).
RESUMABLE_CHANGES = ("device", "eval_every", "checkpoint_every", "gradient_checkpointing")


@dataclass
class TrainConfig(Config):
    """Everything that defines a training run; saved with every checkpoint."""

    keys_name = "training config keys"

    model: str = option("model name or path (see `linearize models`)", "smollm2-135m")
    attention: str | None = option(
        "attention to linearize to (None: keep the model's own attention)", "augmented"
    )
    attention_options: dict[str, Any] = option(
        "options of the attention config (size, conv_size, feature_map, ...)", factory=dict
    )
    layers: list[int] | None = option("layers to linearize (default: all)", None)
    wide_layers: int = option(
        "sliding-window layers with a wide window: those already that wide count, the others "
        "are chosen by recall probes (0: none)",
        6,
    )
    wide_size: int = option(
        "window of the wide layers in tokens (with 4 sinks: an 8,192-token cache; 0: the "
        "model's trained positions minus the sinks)",
        DEFAULT_WIDE_SIZE,
    )
    stage: Stage = option("transfer, finetune or both (transfer, then finetune)", "both")
    data: str = option("training text: 'austen' or a .txt/.md/.jsonl file or folder", "austen")
    text_field: str = option("the text field of JSONL records", "text")
    tokens: int = option("training tokens of the whole run (all stages)", 24_576)
    transfer_tokens: int | None = option(
        "training tokens of the transfer stage when --stage both (default: a twelfth for an "
        "attention with an exact window, like augmented; a third otherwise; at least one step)",
        None,
    )
    # Blocks past the window (512) and up to the decay's horizon (1024), so that the global
    # part and the sinks train at the distances they meet on long texts; the chunk form keeps
    # it O(T).
    block_size: int = option("tokens per training sequence", 1024)
    carry_state: bool = option(
        "finetune stage: read the training text in order, each sequence continuing the "
        "recurrent state its previous block left (detached: truncated backpropagation through "
        "time), so the global part and the wide windows train on memories as long as the text "
        "(with wide windows add --gradient-checkpointing: SmolLM2's carried 8k-token windows "
        "peak at 8.1 GB with it and pass 24 GB without)",
        False,
    )
    batch_size: int = option("sequences per optimizer step, over all processes", 1)
    micro_batch_size: int = option("sequences per forward pass (gradient accumulation)", 1)
    lr: float = option("peak learning rate of the finetune stage", 1e-4)
    new_lr: float | None = option(
        "finetune learning rate of the linearization's new parameters (default: --lr)", None
    )
    transfer_lr: float = option("peak learning rate of the transfer stage", 1e-3)
    weight_decay: float = option("AdamW weight decay", 0.0)
    warmup: float = option("warm-up, as a fraction of each stage's steps", 0.1)
    min_lr_ratio: float = option("the cosine schedule ends at this fraction of the peak", 0.1)
    clip: float = option("clip the gradient norm to this (0: no clipping)", 1.0)
    lora: bool = option("finetune through LoRA adapters on q,k,v,o (merged when saved)", False)
    lora_r: int = option("LoRA rank", 8)
    lora_alpha: float = option("LoRA alpha (scale = alpha / r)", 16.0)
    mse_weight: float = option("transfer stage: weight of the attention-output MSE", 1.0)
    ce_weight: float = option("transfer stage: weight of the next-token cross-entropy", 0.0)
    eval_every: int = option("evaluate perplexity every N steps (0: at the end of stages)", 0)
    eval_tokens: int = option("held-out tokens scored at each evaluation", 4096)
    checkpoint_every: int = option("write a checkpoint every N steps (0: at stage ends)", 25)
    seed: int = option("random seed (initialisation and data order)", 0)
    device: str = option("auto, cpu, cuda, cuda:N", "auto")
    gradient_checkpointing: bool = option(
        "recompute each layer's activations in backward instead of keeping them: long blocks "
        "fit in memory (a SmolLM2 LoRA step at 4,096 tokens: 7.3 GB, ~23 GB without; 1.1x the "
        "time at 1,024)",
        False,
    )
    form: TrainForm = option(
        "attention form while training: parallel (fastest for short blocks, O(T²) memory), "
        "chunk (O(T)) or auto",
        "auto",
    )
    precision: Precision = option("auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16", "auto")
    parallel: Parallel = option("under torchrun: ddp (replicas) or fsdp (sharded, finetune)", "ddp")

    def validate(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}; allowed: {list(STAGES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; allowed: {list(PRECISIONS)}")
        if self.form not in TRAIN_FORMS:
            raise ValueError(f"form={self.form!r}; allowed: {list(TRAIN_FORMS)}")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel={self.parallel!r}; allowed: {list(PARALLELS)}")
        for name in ("tokens", "block_size", "batch_size", "micro_batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "eval_every",
            "eval_tokens",
            "checkpoint_every",
            "ce_weight",
            "mse_weight",
            "wide_layers",
            "wide_size",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        for name in ("lr", "transfer_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.new_lr is not None and not self.new_lr > 0:
            raise ValueError(f"new_lr must be > 0, got {self.new_lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip < 0 or self.weight_decay < 0:
            raise ValueError(
                f"clip and weight_decay must be >= 0, got {self.clip}, {self.weight_decay}"
            )
        if self.mse_weight == 0 and self.ce_weight == 0:
            raise ValueError("the transfer stage needs mse_weight > 0 or ce_weight > 0")
        if self.carry_state and self.stage == "transfer":
            raise ValueError(
                "carry_state applies to the finetune stage; use --stage finetune or both"
            )
        if self.transfer_tokens is not None:
            if self.stage != "both":
                raise ValueError("transfer_tokens splits --stage both; use --tokens otherwise")
            if not 0 < self.transfer_tokens < self.tokens:
                raise ValueError(
                    f"transfer_tokens must be in (0, tokens={self.tokens}), "
                    f"got {self.transfer_tokens}"
                )
        need = len(self.stages()) * self.tokens_per_step
        if self.tokens < need:
            raise ValueError(
                f"tokens={self.tokens} is less than one step per stage ({len(self.stages())} x "
                f"batch_size x block_size = {need}); raise --tokens"
            )
        for name, tokens in self.stage_tokens().items():
            if tokens < self.tokens_per_step:
                raise ValueError(
                    f"the {name} stage gets {tokens} tokens, less than one step of "
                    f"batch_size x block_size = {self.tokens_per_step}; raise --tokens"
                )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def stages(self) -> list[str]:
        """The stages this run goes through, in order."""
        return ["transfer", "finetune"] if self.stage == "both" else [self.stage]

    def stage_tokens(self) -> dict[str, int]:
        """Training tokens of each stage."""
        if self.stage != "both":
            return {self.stage: self.tokens}
        transfer = self.transfer_tokens or max(
            self.tokens // (12 if self._windowed() else 3), self.tokens_per_step
        )
        return {"transfer": transfer, "finetune": self.tokens - transfer}

    def _windowed(self) -> bool:
        """Whether the attention keeps an exact local window (``augmented`` and its kin).

        With one, attention transfer levels off within two steps of 1,024 tokens (held-out
        20.641 after 2 steps, 20.637 after 8) and the rest of the budget buys more as
        fine-tuning: at 24,576 tokens a third on transfer gave 20.065, a twelfth 19.832. A pure
        linear attention still gains from transfer (hedgehog: a third 1,042, a twelfth 1,100;
        docs/results.md), and so does a model whose attention the config does not name."""
        if self.attention is None:
            return False
        return attention_config(self.attention, **self.attention_options).local != "none"

    def stage_steps(self) -> dict[str, int]:
        """Optimizer steps of each stage (whole steps of ``batch_size`` blocks)."""
        return {name: n // self.tokens_per_step for name, n in self.stage_tokens().items()}

    def attention_spec(self) -> dict[str, Any] | None:
        """What ``linearize()`` takes, or None to keep the model's attention."""
        if self.attention is None:
            return None
        return {"name": self.attention, **self.attention_options}

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields that differ from ``other`` and change what a run computes: ``{name: (ours,
        theirs)}`` (the fields in ``RESUMABLE_CHANGES`` are ignored)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            name: (mine[name], theirs[name])
            for name in mine
            if name not in RESUMABLE_CHANGES and mine[name] != theirs[name]
        }
