"""The typed generation config the ``generate`` CLI flags derive from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from linearize.config import Config, option
from linearize.generation.acceptance import AcceptanceOptions, acceptance_rule
from linearize.generation.sampling import SamplingConfig
from linearize.generation.trees import tree_spec

Speculative = Literal["none", "medusa", "draft", "lookup"]
SPECULATIVE_MODES = ("none", "medusa", "draft", "lookup")


@dataclass
class GenerationConfig(Config):
    """Everything that decides what ``generate`` produces and how fast."""

    max_new_tokens: int = option("most tokens to generate", 128)
    temperature: float = option("0 = greedy", 0.0)
    top_k: int = option("sample among the k most likely tokens (0 = all)", 0)
    top_p: float = option("nucleus sampling mass (1 = off)", 1.0)
    repetition_penalty: float = option("penalty on tokens already seen (1 = off)", 1.0)
    seed: int | None = option("sampling seed (ignored when greedy)", None)
    stop: list[str] = option("stop when the text contains one of these", factory=list)
    stop_token_ids: list[int] | None = option("stop tokens (None = the model's EOS)", None)
    chat: bool = option("format the prompt with the tokenizer's chat template", False)
    speculative: Speculative = option("none | medusa | draft | lookup", "none")
    acceptance: str | None = option(
        "greedy | typical | rejection (None: greedy at temperature 0, else rejection)", None
    )
    tree: str = option("Medusa tree: 'auto' (hardware-aware), a default name, or JSON", "auto")
    gamma: int | None = option("draft/lookup chain length (None = hardware-aware choice)", None)
    draft_layers: int | None = option("draft = the target's first N layers", None)
    lookup_ngram: int = option("longest n-gram prompt lookup matches", 3)
    typical_threshold: float = option("typical acceptance: posterior threshold ε", 0.09)
    typical_alpha: float = option("typical acceptance: entropy factor α", 0.3)
    allow_long_context: bool = option(
        "let softmax layers run past the model's trained positions (max_position_embeddings)",
        False,
    )

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.sampling()
        if self.speculative not in SPECULATIVE_MODES:
            raise ValueError(
                f"speculative={self.speculative!r}; allowed: {list(SPECULATIVE_MODES)}"
            )
        rule = self.resolved_acceptance()
        acceptance_rule(rule)
        if rule == "greedy" and self.temperature > 0:
            raise ValueError(
                f"acceptance 'greedy' reproduces greedy decoding; with temperature "
                f"{self.temperature} use 'rejection' (exact) or 'typical'"
            )
        if self.tree != "auto":
            tree_spec(self.tree)
        if self.gamma is not None and self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 (0 = no speculation), got {self.gamma}")
        if self.draft_layers is not None and self.draft_layers < 1:
            raise ValueError(f"draft_layers must be >= 1, got {self.draft_layers}")
        if self.lookup_ngram < 1:
            raise ValueError(f"lookup_ngram must be >= 1, got {self.lookup_ngram}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self.acceptance_options()
        return self

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed
        ).validate()

    def resolved_acceptance(self) -> str:
        if self.acceptance is not None:
            return self.acceptance
        return "greedy" if self.temperature == 0 else "rejection"

    def acceptance_options(self) -> AcceptanceOptions:
        return AcceptanceOptions(self.typical_threshold, self.typical_alpha).validate()
