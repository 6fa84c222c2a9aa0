"""Acceptance rules: which verified candidates to keep, and the token that follows them.

A rule reads a :class:`Verification` (the tree, its node tokens, the target's logits at every
node) and returns an :class:`Acceptance`: the accepted root→node path and the next token, sampled
from the last accepted node's distribution (the "bonus" or "correction" token; it is not fed yet
and becomes the next step's root). Rules, by name (:data:`ACCEPTANCE_RULES`):

- ``greedy``: follow the target's argmax down the tree. Output identical to greedy decoding.
- ``typical``: Medusa's typical acceptance: keep a candidate whose probability under its parent's
  distribution exceeds ``min(threshold, alpha · exp(−entropy))``; take the deepest such path.
  Fast, not distribution-exact; greedy at temperature 0.
- ``rejection``: exact speculative sampling, multi-candidate recursive rejection (SpecInfer,
  Medusa's rejection variant). At a node with target distribution ``p``, children are tried in
  order: a child whose token ``c`` was sampled from a draft distribution ``q`` is accepted with
  probability ``min(1, p(c)/q(c))``, otherwise ``p ← norm(max(p − q, 0))``; a deterministic
  candidate (Medusa's top-k, prompt lookup: ``q`` a point mass) is accepted with probability
  ``p(c)``, otherwise ``p ← norm(p with c removed)``. When every child is rejected the next token
  is sampled from what is left of ``p``. Each emitted token is then distributed exactly as ``p``:
  the output distribution equals sampling from the model, for chains and for trees.

Per-node distributions condition on the node's own history (committed tokens + its ancestors), so
a repetition penalty is applied exactly as plain decoding would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from linearize.generation.sampling import Sampler
from linearize.ops.tree import Tree


@dataclass
class AcceptanceOptions:
    """Parameters of the typical rule (Medusa's defaults)."""

    typical_threshold: float = 0.09
    typical_alpha: float = 0.3

    def validate(self) -> AcceptanceOptions:
        if not 0 < self.typical_threshold <= 1:
            raise ValueError(f"typical_threshold must lie in (0, 1], got {self.typical_threshold}")
        if not self.typical_alpha > 0:
            raise ValueError(f"typical_alpha must be > 0, got {self.typical_alpha}")
        return self


@dataclass
class Verification:
    """The target's verdict on a proposed tree. ``tokens[0]`` is the root; ``logits: [N, V]``;
    ``history``: the tokens before the root; ``proposals[i]``: the draft distribution node ``i``'s
    token was sampled from (``None``: chosen deterministically)."""

    tree: Tree
    tokens: list[int]
    logits: Tensor
    history: list[int]
    sampler: Sampler
    proposals: list[Tensor | None] | None = None
    _probs: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._children: list[list[int]] = [[] for _ in self.tokens]
        for node, parent in enumerate(self.tree.parents.tolist()):
            if parent >= 0:
                self._children[parent].append(node)

    def children(self, node: int) -> list[int]:
        return self._children[node]

    def context(self, node: int) -> list[int]:
        """What node ``node``'s prediction conditions on: history, root, ..., the node."""
        return self.history + [self.tokens[i] for i in self.tree.path(node).tolist()]

    def _history(self, node: int) -> list[int]:
        return self.context(node) if self.sampler.uses_history else []

    def probs(self, node: int) -> Tensor:
        if node not in self._probs:
            self._probs[node] = self.sampler.probs(self.logits[node], self._history(node))
        return self._probs[node]

    def argmax(self, node: int) -> int:
        return self.sampler.argmax(self.logits[node], self._history(node))

    def proposal(self, node: int) -> Tensor | None:
        return None if self.proposals is None else self.proposals[node]


@dataclass
class Acceptance:
    """``path``: accepted nodes, root first; ``next_token``: sampled after the last of them."""

    path: list[int]
    next_token: int

    @property
    def tokens_emitted(self) -> int:
        """Accepted candidates plus the next token (≥ 1)."""
        return len(self.path)


Rule = Callable[[Verification, AcceptanceOptions], Acceptance]


def accept_greedy(v: Verification, options: AcceptanceOptions) -> Acceptance:
    path, node = [0], 0
    while True:
        best = v.argmax(node)
        match = next((c for c in v.children(node) if v.tokens[c] == best), None)
        if match is None:
            return Acceptance(path, best)
        path.append(match)
        node = match


def accept_typical(v: Verification, options: AcceptanceOptions) -> Acceptance:
    if v.sampler.greedy:
        return accept_greedy(v, options)
    acceptable, best = {0}, 0
    depths = v.tree.depths.tolist()
    for node, parent in enumerate(v.tree.parents.tolist()):
        if parent < 0 or parent not in acceptable:
            continue
        p = v.probs(parent)
        entropy = float(-torch.special.xlogy(p, p).sum())
        threshold = min(options.typical_threshold, options.typical_alpha * math.exp(-entropy))
        if float(p[v.tokens[node]]) > threshold:
            acceptable.add(node)
            if depths[node] > depths[best]:
                best = node
    path = v.tree.path(best).tolist()
    return Acceptance(path, v.sampler.sample(v.probs(best)))


def _try_child(v: Verification, p: Tensor, child: int) -> tuple[bool, Tensor]:
    """Accept ``child`` against the residual ``p``, or return the residual after rejecting it."""
    token, q = v.tokens[child], v.proposal(child)
    ratio = float(p[token]) if q is None else min(1.0, float(p[token] / q[token]))
    if ratio >= 1 or ratio > 0 and not v.sampler.greedy and v.sampler.uniform() < ratio:
        return True, p
    if q is None:
        residual = p.clone()
        residual[token] = 0
    else:
        residual = (p - q.to(p.dtype)).clamp_min(0)
    total = residual.sum()
    # A rejection has probability Σ max(p − q, 0) > 0, so the residual has mass; keep p when
    # rounding says otherwise.
    return False, residual / total if total > 0 else p


def accept_rejection(v: Verification, options: AcceptanceOptions) -> Acceptance:
    path, node = [0], 0
    while True:
        p = v.probs(node)
        for child in v.children(node):
            accepted, p = _try_child(v, p, child)
            if accepted:
                path.append(child)
                node = child
                break
        else:
            return Acceptance(path, v.sampler.sample(p))


ACCEPTANCE_RULES: dict[str, Rule] = {
    "greedy": accept_greedy,
    "typical": accept_typical,
    "rejection": accept_rejection,
}


def list_acceptance_rules() -> list[str]:
    return list(ACCEPTANCE_RULES)


def acceptance_rule(name: str) -> Rule:
    if name not in ACCEPTANCE_RULES:
        raise ValueError(f"unknown acceptance rule {name!r}; valid: {list_acceptance_rules()}")
    return ACCEPTANCE_RULES[name]
