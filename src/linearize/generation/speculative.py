"""Proposers: where speculative candidates come from (Medusa heads, a draft model, the context).

Every proposer turns the pending root token into a :class:`Proposal`: a tree whose node 0 is the
root, the node tokens, and (for sampled drafts) the distribution each token was drawn from. The
decode loop verifies it in one target pass, accepts, commits, and then tells the proposer what
was accepted (:meth:`observe`) so it can advance its own state.

- :class:`MedusaProposer`: the top-k of each head, arranged by a tree spec.
- :class:`DraftProposer`: any :class:`Decoder` sharing the tokenizer proposes a chain of γ
  tokens by its own recurrent decoding. Its states after each draft token are kept (values, see
  ``ModelState``); after acceptance the state of the accepted prefix is picked and decoding
  continues from it (for KV caches this is the rollback: later writes overwrite the rejected
  slots). :func:`truncated_draft` builds one from the target's first layers.
- :class:`LookupProposer`: prompt-lookup (n-gram) drafting: the tokens that followed the latest
  earlier occurrence of the context's last n tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from linearize.generation.acceptance import Acceptance
from linearize.generation.medusa import MedusaHeads
from linearize.generation.sampling import Sampler
from linearize.generation.trees import TreeBuffers
from linearize.models.config import ModelConfig
from linearize.models.decoder import Decoder, ModelState
from linearize.ops.tree import Tree


@dataclass
class Proposal:
    """``tokens[0]`` is the root; ``proposals[i]`` the draft distribution of node ``i``'s token
    (``None`` for deterministic candidates)."""

    tree: Tree
    tokens: list[int]
    proposals: list[Tensor | None] | None = None


@dataclass
class Setting:
    """What a step may propose: a Medusa tree or a chain length γ."""

    buffers: TreeBuffers | None = None
    gamma: int = 0


class Proposer(Protocol):
    kind: str
    passes: int

    def start(self, prompt: list[int], hidden: Tensor) -> None: ...

    def propose(
        self, root: int, history: list[int], sampler: Sampler, setting: Setting
    ) -> Proposal: ...

    def observe(self, proposal: Proposal, acceptance: Acceptance, hidden: Tensor) -> None: ...


_CHAINS: dict[int, Tree] = {}


def chain_tree(length: int) -> Tree:
    """The chain root → 1 → ... → ``length − 1`` (cached: trees are immutable)."""
    if length not in _CHAINS:
        _CHAINS[length] = Tree.from_parents([-1, *range(length - 1)])
    return _CHAINS[length]


@dataclass
class MedusaProposer:
    heads: MedusaHeads
    lm_head: nn.Module | None = None
    top_k: int = 10
    kind: str = "medusa"
    passes: int = 0
    depth: int | None = None
    _topk: Tensor | None = field(default=None, repr=False)
    _hidden: Tensor | None = field(default=None, repr=False)

    def read_heads(self, hidden: Tensor, count: int | None = None) -> None:
        """The top-k tokens ``[count, k]`` of the first ``count`` heads (default: as many as the
        last tree used, else all) at ``hidden``: a shallow tree reads fewer heads, and fewer
        rows through the vocabulary projection."""
        self._hidden = hidden
        logits = self.heads(hidden, self.lm_head, count or self.depth)
        self._topk = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices.cpu()

    def start(self, prompt: list[int], hidden: Tensor) -> None:
        self.read_heads(hidden)

    def propose(
        self, root: int, history: list[int], sampler: Sampler, setting: Setting
    ) -> Proposal:
        buffers = setting.buffers
        if buffers is None or len(buffers) == 1:
            return Proposal(chain_tree(1), [root])
        assert self._topk is not None, "start() reads the heads first"
        self.depth = buffers.num_heads
        if self.depth <= len(self.heads) and self._topk.shape[0] < self.depth:
            # A re-plan chose a deeper tree than the heads were last read for.
            self.read_heads(self._hidden)
        if buffers.num_heads > len(self.heads) or buffers.top_k > self._topk.shape[1]:
            raise ValueError(
                f"tree needs {buffers.num_heads} heads and top-{buffers.top_k}; these heads "
                f"give {len(self.heads)} heads and top-{self._topk.shape[1]}"
            )
        return Proposal(buffers.tree, buffers.candidates(root, self._topk.clone()).tolist())

    def observe(self, proposal: Proposal, acceptance: Acceptance, hidden: Tensor) -> None:
        self.read_heads(hidden[acceptance.path[-1]])


class DraftProposer:
    """A draft :class:`Decoder` proposing a chain of γ tokens by its own recurrent decoding."""

    kind = "draft"

    def __init__(self, draft: Decoder, target: Decoder) -> None:
        check_draft(target, draft)
        self.draft = draft
        self.passes = 0
        self.state: ModelState | None = None
        self.pending: list[int] = []
        self._states: list[ModelState] = []

    def _feed(self, tokens: list[int], state: ModelState | None) -> tuple[Tensor, ModelState]:
        ids = torch.tensor([tokens], dtype=torch.long, device=self.draft.device)
        logits, state = self.draft(ids, state=state)
        return logits[0, -1], state

    def start(self, prompt: list[int], hidden: Tensor) -> None:
        _, self.state = self._feed(prompt, None)
        self.pending = []

    def propose(
        self, root: int, history: list[int], sampler: Sampler, setting: Setting
    ) -> Proposal:
        gamma = setting.gamma
        if gamma < 1:
            return Proposal(chain_tree(1), [root])
        logits, state = self._feed([*self.pending, root], self.state)
        self.passes += 1
        tokens, dists, states = [root], [None], [state]
        # The draft's distribution reads the history only under a repetition penalty.
        context = [*history, root] if sampler.uses_history else []
        for i in range(gamma):
            q = sampler.probs(logits, context)
            token = sampler.sample(q)
            tokens.append(token)
            dists.append(None if sampler.greedy else q)
            context.append(token)
            if i < gamma - 1:
                logits, state = self._feed([token], state)
                self.passes += 1
                states.append(state)
        self._states = states
        return Proposal(chain_tree(gamma + 1), tokens, dists)

    def observe(self, proposal: Proposal, acceptance: Acceptance, hidden: Tensor) -> None:
        if len(proposal.tokens) == 1:
            # A plain step the draft did not see: it feeds the root with the next proposal.
            self.pending.append(proposal.tokens[0])
            return
        accepted = len(acceptance.path) - 1
        if accepted < len(self._states):
            self.state, self.pending = self._states[accepted], []
        else:
            # Every draft was accepted: the draft has not fed its own last token yet.
            self.state, self.pending = self._states[-1], [proposal.tokens[-1]]
        self._states = []


@dataclass
class LookupProposer:
    """Prompt-lookup drafting: continue the latest earlier match of the last n tokens."""

    max_ngram: int = 3
    min_ngram: int = 1
    kind: str = "lookup"
    passes: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"lookup n-gram sizes must satisfy 1 <= min <= max, got "
                f"min={self.min_ngram}, max={self.max_ngram}"
            )

    def start(self, prompt: list[int], hidden: Tensor) -> None:
        pass

    def lookup(self, context: list[int], gamma: int) -> list[int]:
        """Up to ``gamma`` tokens that followed an earlier match of the context's last n tokens
        (longest n first; the latest match with ``gamma`` tokens after it, else the match with
        the most tokens after it)."""
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = context[L - n :]
            best: list[int] = []
            for start in range(L - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    follow = context[start + n : start + n + gamma]
                    if len(follow) > len(best):
                        best = follow
                    if len(best) == gamma:
                        break
            if best:
                return best
        return []

    def propose(
        self, root: int, history: list[int], sampler: Sampler, setting: Setting
    ) -> Proposal:
        drafts = self.lookup([*history, root], setting.gamma) if setting.gamma > 0 else []
        return Proposal(chain_tree(len(drafts) + 1), [root, *drafts])

    def observe(self, proposal: Proposal, acceptance: Acceptance, hidden: Tensor) -> None:
        pass


def check_draft(target: Decoder, draft: Decoder) -> None:
    """Raise unless ``draft`` shares ``target``'s vocabulary (and tokenizer, when both have one)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(
            f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}): "
            "a draft must share the target's tokenizer"
        )
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is not None and dt is not None and len(tt) != len(dt):
        raise ValueError(
            f"the draft's tokenizer ({len(dt)} tokens) differs from the target's ({len(tt)})"
        )


def truncated_draft(model: Decoder, num_layers: int) -> Decoder:
    """A draft made of ``model``'s embeddings, first ``num_layers`` layers, final norm and head.

    The modules are shared, not copied (no extra memory); the draft has its own states.
    """
    total = model.config.num_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"a truncated draft needs 1 <= layers < {total}, got {num_layers}")
    data = model.config.to_dict()
    data.update(num_layers=num_layers, attention=data["attention"][:num_layers])
    with torch.device("meta"):
        draft = Decoder(ModelConfig.from_dict(data))
    draft.embed_tokens = model.embed_tokens
    if hasattr(model, "embed_positions"):
        draft.embed_positions = model.embed_positions
    draft.layers = nn.ModuleList(model.layers[:num_layers])
    draft.norm = model.norm
    draft.lm_head = model.lm_head
    draft.tokenizer = model.tokenizer
    return draft
