"""Hardware-aware speculation: pick the tree size or γ that maximises expected tokens per second.

On a GPU a 64-node verification costs about one decode step; on a CPU it costs several. So the
choice is measured, not assumed: :func:`calibrate` times one plain decode step, one verification
pass of N tree nodes (plus the commit) for a few N, and the proposer's own cost per step, on this
machine and this context. Expected speed of a setting = expected tokens per step / cost per step:

- Medusa tree T: tokens/step = 1 + Σ_{paths} Π rank-accuracy (the heads' measured accuracies,
  assumed independent), cost = verify(|T|) + heads.
- chain of γ drafts with per-token acceptance a: tokens/step = (1 − a^{γ+1}) / (1 − a),
  cost = verify(γ + 1) + γ · draft step.

The best setting is compared with plain decoding (1 token per decode step); speculation is off
when it would not be faster. While decoding, :class:`Planner` counts what was actually accepted
and re-plans every few steps (per-depth corrections for trees, the running acceptance rate for
chains), so optimistic accuracies do not keep a tree that does not pay.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from linearize.generation.speculative import Setting, chain_tree
from linearize.generation.trees import (
    TREE_SIZES,
    TYPICAL_RANK_ACCURACY,
    Path,
    build_tree_buffers,
    expected_accepted,
    tree_from_accuracies,
)
from linearize.models.decoder import Decoder, ModelState
from linearize.ops.tree import Tree

# Timed plain steps in an engine's calibration (at least).
STEP_REPEATS = 5


def time_call(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Calibration:
    """Measured seconds: ``step`` one plain decode step; ``verify[n]`` an ``n``-node tree pass
    with its commit; ``overhead`` the proposer's own cost per step (heads, one draft step);
    ``fast_step`` one plain step with the engine's faster arithmetic (``None``: it has none),
    which plain decoding takes when speculation is off from the start."""

    step: float
    verify: dict[int, float]
    overhead: float = 0.0
    context: int = 0
    fast_step: float | None = None

    def fastest(self) -> Calibration:
        """The same measurements, with plain decoding at its fastest arithmetic."""
        if self.fast_step is None:
            return self
        return replace(self, step=min(self.step, self.fast_step), fast_step=None)

    def verify_cost(self, nodes: int) -> float:
        """Linear interpolation between measured sizes (linear extrapolation past the last)."""
        sizes = sorted(self.verify)
        if nodes in self.verify:
            return self.verify[nodes]
        lo = max((s for s in sizes if s < nodes), default=sizes[0])
        hi = min((s for s in sizes if s > nodes), default=sizes[-1])
        if lo == hi:
            return self.verify[lo] * nodes / lo
        w = (nodes - lo) / (hi - lo)
        return (1 - w) * self.verify[lo] + w * self.verify[hi]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """The calibration :meth:`to_dict` gave (JSON's string keys of ``verify`` read back as
        tree sizes); a ``ValueError`` for anything else."""
        verify = {int(n): float(s) for n, s in data["verify"].items()}
        if not verify or min(verify) < 1 or min(verify.values()) <= 0 or data["step"] <= 0:
            raise ValueError(f"not a calibration: {data!r}")
        fast = data.get("fast_step")
        return cls(
            step=float(data["step"]),
            verify=verify,
            overhead=float(data.get("overhead", 0.0)),
            context=int(data.get("context", 0)),
            fast_step=None if fast is None else float(fast),
        )


@dataclass
class Plan:
    """The chosen setting and why. ``nodes``: tree nodes verified per step (1 = plain)."""

    mode: str
    nodes: int
    gamma: int
    expected_tokens_per_step: float
    expected_speedup: float
    reason: str
    paths: list[Path] | None = None

    @property
    def speculating(self) -> bool:
        return self.nodes > 1

    def setting(self) -> Setting:
        if self.mode == "medusa":
            return Setting(buffers=build_tree_buffers(self.paths or []))
        return Setting(gamma=self.gamma)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("expected_tokens_per_step", "expected_speedup"):
            if math.isnan(data[key]):
                data[key] = None
        data["paths"] = None if self.paths is None else [list(p) for p in self.paths]
        return data


def _plain(mode: str, reason: str) -> Plan:
    return Plan(mode, 1, 0, 1.0, 1.0, reason)


def fixed_plan(mode: str, paths: list[Path] | None = None, gamma: int = 0) -> Plan:
    """A setting chosen by the user: no calibration, no re-planning."""
    nodes = len(paths) + 1 if mode == "medusa" and paths is not None else gamma + 1
    return Plan(mode, nodes, gamma, float("nan"), float("nan"), "set by the user", paths)


def plan_medusa(
    calibration: Calibration,
    rank_accuracy: Sequence[Sequence[float]],
    sizes: Sequence[int] = TREE_SIZES,
) -> Plan:
    """The tree size (from ``sizes``) with the best expected tokens/s, or plain decoding."""
    best = _plain("medusa", "plain decoding is fastest on this machine")
    for n in sizes:
        if n < 2:
            continue
        paths = tree_from_accuracies(rank_accuracy, n)
        tokens = expected_accepted(paths, rank_accuracy)
        cost = calibration.verify_cost(len(paths) + 1) + calibration.overhead
        speedup = tokens * calibration.step / cost
        if speedup > best.expected_speedup:
            reason = f"best expected tokens/s over tree sizes {list(sizes)}"
            best = Plan("medusa", len(paths) + 1, 0, tokens, speedup, reason, paths)
    return best


def chain_tokens(acceptance: float, gamma: int) -> float:
    """Expected tokens per step of a γ-chain with per-token acceptance ``acceptance``."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(gamma + 1) if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)


def plan_chain(
    calibration: Calibration, acceptance: float, mode: str, gammas: Sequence[int]
) -> Plan:
    """The γ with the best expected tokens/s, or plain decoding."""
    best = _plain(mode, "plain decoding is fastest on this machine")
    for gamma in gammas:
        if gamma < 1:
            continue
        tokens = chain_tokens(acceptance, gamma)
        cost = calibration.verify_cost(gamma + 1) + gamma * calibration.overhead
        speedup = tokens * calibration.step / cost
        if speedup > best.expected_speedup:
            reason = f"best expected tokens/s for acceptance {acceptance:.2f} over γ {list(gammas)}"
            best = Plan(mode, gamma + 1, gamma, tokens, speedup, reason)
    return best


@dataclass
class Planner:
    """Plans from a calibration and a prior acceptance, then re-plans from observed acceptance.

    ``rank_accuracy`` (Medusa) or ``acceptance`` (chains) is the prior; every ``replan_every``
    speculative steps the observed accepted lengths correct it.
    """

    mode: str
    calibration: Calibration | None
    rank_accuracy: list[list[float]] | None = None
    fixed: Plan | None = None
    acceptance: float = 0.6
    sizes: Sequence[int] = TREE_SIZES
    gammas: Sequence[int] = (1, 2, 3, 4, 5, 6, 8)
    replan_every: int = 8
    plan: Plan | None = None
    history: list[dict] = field(default_factory=list)
    _reached: list[int] = field(default_factory=list)
    _steps: int = 0
    _accepted: int = 0
    _rejections: int = 0

    def choose(self) -> Plan:
        if self.fixed is not None:
            self.plan = self.fixed
        elif self.mode == "medusa":
            assert self.rank_accuracy is not None
            self.plan = plan_medusa(self.calibration, self.rank_accuracy, self.sizes)
        else:
            self.plan = plan_chain(self.calibration, self.acceptance, self.mode, self.gammas)
        self.history.append(self.plan.to_dict())
        return self.plan

    def observe(self, accepted: int, proposed_depth: int) -> Plan | None:
        """Record one speculative step (``accepted`` candidates out of a tree ``proposed_depth``
        deep); returns a new plan when it is time to re-plan."""
        if proposed_depth < 1 or self.fixed is not None:
            return None
        self._steps += 1
        self._accepted += accepted
        self._rejections += accepted < proposed_depth
        while len(self._reached) <= proposed_depth:
            self._reached.append(0)
        for d in range(accepted + 1):
            self._reached[d] += 1
        if self._steps % self.replan_every:
            return None
        if self.mode == "medusa":
            self._correct_accuracies()
        else:
            # Per-token acceptance: the geometric MLE, with the prior worth two observations.
            self.acceptance = (self._accepted + 2 * self.acceptance) / (
                self._accepted + self._rejections + 2
            )
            self._accepted = self._rejections = 0
        return self.choose()

    def _correct_accuracies(self) -> None:
        """Scale head d's accuracies by observed / predicted P(reach depth d+1 | reached d)."""
        assert self.rank_accuracy is not None and self.plan is not None
        paths = self.plan.paths or []
        for d in range(1, len(self._reached)):
            tried = self._reached[d - 1]
            if tried < 4 or d > len(self.rank_accuracy):
                continue
            observed = self._reached[d] / tried
            predicted = _reach(paths, self.rank_accuracy, d) / max(
                _reach(paths, self.rank_accuracy, d - 1), 1e-9
            )
            if predicted <= 0:
                continue
            row = self.rank_accuracy[d - 1]
            scale = min(max(observed / predicted, 0.05), 1 / max(sum(row), 1e-9))
            self.rank_accuracy[d - 1] = [a * scale for a in row]
        self._reached = []


def _reach(paths: Sequence[Path], rank_accuracy: Sequence[Sequence[float]], depth: int) -> float:
    """P(the accepted path is at least ``depth`` deep) under independent head accuracies."""
    if depth == 0:
        return 1.0
    return expected_accepted([p for p in paths if len(p) == depth], rank_accuracy) - 1.0


def _calibration_trees(sizes: Sequence[int], chain: bool) -> list[Tree]:
    """The trees whose verification cost is timed: chains (a draft model's guesses) or
    typical-accuracy Medusa trees of each size."""
    if chain:
        return [chain_tree(n) for n in sorted(set(sizes))]
    return [
        build_tree_buffers(tree_from_accuracies(TYPICAL_RANK_ACCURACY, n)).tree
        for n in sorted(set(sizes))
    ]


def _pays(seconds: float, cost: float, plain: float, ceiling: float | None) -> bool:
    """Whether a verification pass of ``seconds`` (plus the proposer's ``cost``) could beat
    plain steps of ``plain`` seconds when no setting gives more than ``ceiling`` tokens per pass.
    Verification costs grow with the tree, so once one size cannot pay, no larger one can: the
    calibration stops there (each size is a graph to build on an engine, and a pass to time)."""
    return ceiling is None or seconds + cost < ceiling * plain


def calibrate(
    model: Decoder,
    state: ModelState,
    token: int,
    sizes: Sequence[int],
    *,
    chain: bool,
    overhead: Callable[[], object] | None = None,
    repeats: int = 2,
    ceiling: float | None = None,
) -> Calibration:
    """Time one decode step and ``n``-node verification passes on ``state`` (left usable), the
    sizes in increasing order up to the first that cannot pay when no setting gives more than
    ``ceiling`` tokens per pass (``None``: every size)."""
    one = torch.tensor([[token]], dtype=torch.long, device=model.device)
    root = torch.zeros(1, dtype=torch.long)
    step = time_call(lambda: model(one, state=state), repeats)
    cost = time_call(overhead, repeats) if overhead is not None else 0.0
    verify = {}
    for tree in _calibration_trees(sizes, chain):
        ids = one.expand(1, len(tree))

        def run(tree=tree, ids=ids) -> None:
            _, _, drafts = model.forward_tree(ids, tree, state)
            model.commit(state, drafts, root)

        verify[len(tree)] = time_call(run, repeats)
        if not _pays(verify[len(tree)], cost, step, ceiling):
            break
    return Calibration(step, verify, cost, state.pos)


def calibrate_engine(
    engine: Any,
    token: int,
    sizes: Sequence[int],
    *,
    chain: bool,
    overhead: Callable[[], object] | None = None,
    repeats: int = 2,
    ceiling: float | None = None,
) -> Calibration:
    """:func:`calibrate` on a fast engine (``linearize.engine``), whose state changes in place:
    each timed call is undone from a snapshot, and the restore's own time is taken off. An
    engine built with fp32 arithmetic (exact speculation) also times a step with int8 arithmetic
    (``fast_step``)."""
    saved = engine.snapshot()
    undo = time_call(lambda: engine.restore(saved), repeats)

    def step() -> None:
        engine.step(token)
        engine.restore(saved)

    cost = time_call(overhead, repeats) if overhead is not None else 0.0
    # Plain steps are cheap to time and decide the arithmetic plain decoding keeps (a stored
    # calibration keeps it across processes): a median over more of them.
    steps = max(repeats, STEP_REPEATS)
    one = max(time_call(step, steps) - undo, 1e-6)
    fast = None
    if getattr(engine, "accuracy", "int8") != "int8":
        engine.use_step_arithmetic("int8")
        fast = max(time_call(step, steps) - undo, 1e-6)
        engine.use_step_arithmetic(None)
    plain = one if fast is None else min(one, fast)
    verify = {}
    for tree in _calibration_trees(sizes, chain):

        def run(tree=tree) -> None:
            engine.forward_tree([token] * len(tree), tree)
            engine.commit([0])
            engine.restore(saved)

        verify[len(tree)] = max(time_call(run, repeats) - undo, 1e-6)
        if not _pays(verify[len(tree)], cost, plain, ceiling):
            break
    return Calibration(one, verify, cost, engine.pos, fast)
