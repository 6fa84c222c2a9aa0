"""Generation: sampling, the decode loop, Medusa heads and trees, exact speculative decoding.

The pipeline of a speculative step is propose → verify → accept → commit (see ``decode.py``);
every mode decodes from the model's recurrent state (or KV cache) and verifies in one pass with
each layer's exact tree form.
"""

from linearize.generation.acceptance import (
    ACCEPTANCE_RULES,
    Acceptance,
    AcceptanceOptions,
    Verification,
    acceptance_rule,
    list_acceptance_rules,
)
from linearize.generation.batch import generate_batch
from linearize.generation.config import SPECULATIVE_MODES, GenerationConfig
from linearize.generation.decode import GenerationResult, generate, iter_generate, stream
from linearize.generation.medusa import MedusaConfig, MedusaHeads, load_heads, save_heads
from linearize.generation.medusa_train import (
    MedusaTrainConfig,
    evaluate_heads,
    self_distill_tokens,
    train_medusa,
)
from linearize.generation.planner import Calibration, Plan, Planner, calibrate
from linearize.generation.sampling import Sampler, SamplingConfig
from linearize.generation.speculative import (
    DraftProposer,
    LookupProposer,
    MedusaProposer,
    Proposal,
    check_draft,
    truncated_draft,
)
from linearize.generation.trees import (
    DEFAULT_TREES,
    TreeBuffers,
    build_tree_buffers,
    list_trees,
    tree_from_accuracies,
    tree_spec,
)

__all__ = [
    "ACCEPTANCE_RULES",
    "DEFAULT_TREES",
    "SPECULATIVE_MODES",
    "Acceptance",
    "AcceptanceOptions",
    "Calibration",
    "DraftProposer",
    "GenerationConfig",
    "GenerationResult",
    "LookupProposer",
    "MedusaConfig",
    "MedusaHeads",
    "MedusaProposer",
    "MedusaTrainConfig",
    "Plan",
    "Planner",
    "Proposal",
    "Sampler",
    "SamplingConfig",
    "TreeBuffers",
    "Verification",
    "acceptance_rule",
    "build_tree_buffers",
    "calibrate",
    "check_draft",
    "evaluate_heads",
    "generate",
    "generate_batch",
    "iter_generate",
    "list_acceptance_rules",
    "list_trees",
    "load_heads",
    "save_heads",
    "self_distill_tokens",
    "stream",
    "train_medusa",
    "tree_from_accuracies",
    "tree_spec",
    "truncated_draft",
]
