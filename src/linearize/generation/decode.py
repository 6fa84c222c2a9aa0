"""The decode loop: prefill, then plain or speculative steps, for every model we build.

A speculative step is a named pipeline over the model's O(1) recurrent state (or KV cache):

1. **propose** — the proposer (Medusa heads, a draft model, prompt lookup) hangs candidates
   below the root, the token sampled last step and not fed yet;
2. **verify** — one ``model.forward_tree`` pass feeds the root and scores every candidate, each
   layer in its exact tree form (the state is not touched);
3. **accept** — an acceptance rule walks the tree and samples the next token;
4. **commit** — ``model.commit`` appends the accepted root→node path to the state, from what the
   tree pass computed: no second forward pass.

``forward_passes`` counts target passes after the prefill; ``mean_accepted`` is tokens emitted
per such pass (1.0 for plain decoding; accepted candidates + the next token when speculating).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from linearize.engine import one_torch_thread
from linearize.generation.acceptance import Verification, acceptance_rule
from linearize.generation.calibrations import CalibrationStore, calibration_key
from linearize.generation.config import GenerationConfig
from linearize.generation.medusa import MedusaHeads
from linearize.generation.planner import (
    Calibration,
    Planner,
    calibrate,
    calibrate_engine,
    fixed_plan,
)
from linearize.generation.sampling import Sampler
from linearize.generation.speculative import (
    DraftProposer,
    LookupProposer,
    MedusaProposer,
    Proposer,
    Setting,
    truncated_draft,
)
from linearize.generation.streaming import TextStream, check_context, encode_prompt
from linearize.generation.trees import TREE_SIZES, TYPICAL_RANK_ACCURACY, tree_spec
from linearize.models.decoder import Decoder, ModelState

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What one prompt produced, and how fast."""

    token_ids: list[int]
    text: str | None
    prompt_ids: list[int]
    finish_reason: str
    forward_passes: int
    draft_passes: int
    mean_accepted: float
    seconds: float
    prefill_s: float
    calibration_s: float
    plan: dict | None = None
    plans: list[dict] = field(default_factory=list)
    calibration: Calibration | None = None
    # A fast engine's step arithmetic at the end ("int8", "fp32"; None: the torch reference).
    arithmetic: str | None = None

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole call (prefill and calibration included)."""
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the decode loop alone (the paper's protocol)."""
        decode = self.seconds - self.prefill_s - self.calibration_s
        return (len(self.token_ids) - 1) / decode if decode > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "tokens_per_s": self.tokens_per_s,
            "forward_passes": self.forward_passes,
            "mean_accepted": self.mean_accepted,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "draft_passes": self.draft_passes,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_ids),
            "seconds": self.seconds,
            "prefill_s": self.prefill_s,
            "calibration_s": self.calibration_s,
            "speculation": self.plan,
            "plans": self.plans,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "arithmetic": self.arithmetic,
        }


# --- proposers by name ------------------------------------------------------------------------


def _no_proposer(
    model: Decoder, config: GenerationConfig, heads: MedusaHeads | None, draft: Decoder | None
) -> None:
    return None


def _medusa_proposer(
    model: Decoder, config: GenerationConfig, heads: MedusaHeads | None, draft: Decoder | None
) -> MedusaProposer:
    if heads is None:
        raise ValueError(
            "speculative 'medusa' needs Medusa heads and this call has none (pass "
            "heads=load_heads(DIR); train them with `linearize train-medusa`)"
        )
    heads.check_model(model)
    heads.to(device=model.device, dtype=model.dtype)
    top_k = 10
    if config.tree != "auto":
        spec = tree_spec(config.tree)
        top_k = max((p[-1] + 1 for p in spec), default=1)
        depth = max((len(p) for p in spec), default=0)
        if depth > len(heads):
            raise ValueError(
                f"tree {config.tree!r} is {depth} deep but the model has {len(heads)} Medusa "
                "heads: pick a shallower tree (or 'auto')"
            )
    return MedusaProposer(heads, lm_head=model.lm_head, top_k=top_k)


def _draft_proposer(
    model: Decoder, config: GenerationConfig, heads: MedusaHeads | None, draft: Decoder | None
) -> DraftProposer:
    if draft is None and config.draft_layers is not None:
        draft = truncated_draft(model, config.draft_layers)
    if draft is None:
        raise ValueError(
            "speculative 'draft' needs a draft model (--draft MODEL or --draft-layers)"
        )
    return DraftProposer(draft, model)


def _lookup_proposer(
    model: Decoder, config: GenerationConfig, heads: MedusaHeads | None, draft: Decoder | None
) -> LookupProposer:
    return LookupProposer(max_ngram=config.lookup_ngram)


PROPOSERS: dict[str, Callable[..., Proposer | None]] = {
    "none": _no_proposer,
    "medusa": _medusa_proposer,
    "draft": _draft_proposer,
    "lookup": _lookup_proposer,
}


def stop_token_ids(model: Decoder, config: GenerationConfig) -> set[int]:
    """The tokens that end generation: ``config.stop_token_ids`` or the model's EOS."""
    if config.stop_token_ids is not None:
        return set(config.stop_token_ids)
    eos = model.config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Output:
    """What one sequence emitted: tokens, text deltas, and why it finished. The stop rules
    (stop tokens, stop strings, ``max_new_tokens``) every decoding caller shares."""

    def __init__(self, model: Decoder, config: GenerationConfig) -> None:
        self.stops = stop_token_ids(model, config)
        self.stream = TextStream(model.tokenizer, config.stop) if model.tokenizer else None
        self.limit = config.max_new_tokens
        self.tokens: list[int] = []
        self.reason: str | None = None

    def push(self, token: int) -> str:
        """Record ``token``; return the text it adds (held back while a stop string may
        still match). Sets ``reason`` ("eos", "stop" or "length") when it ends the sequence."""
        self.tokens.append(token)
        delta = self.stream.push(token) if self.stream is not None else ""
        if token in self.stops:
            self.reason = "eos"
        elif self.stream is not None and self.stream.stopped:
            self.reason = "stop"
        elif len(self.tokens) >= self.limit:
            self.reason = "length"
        return delta

    def finish(self) -> str:
        """The text held back at the end (a partial character or a stop-string prefix)."""
        return self.stream.finish() if self.stream is not None else ""

    @property
    def text(self) -> str | None:
        return None if self.stream is None else self.stream.text


# --- the loop ---------------------------------------------------------------------------------


class Decoding:
    """One sequence's decoding: ``prefill(prompt)`` then ``step()`` until the caller stops."""

    def __init__(
        self,
        model: Decoder,
        config: GenerationConfig,
        proposer: Proposer | None,
        calibration: Calibration | None = None,
        engine: Any = None,
        calibrations: CalibrationStore | None = None,
    ) -> None:
        self.model, self.config, self.proposer = model, config, proposer
        # Timings kept across processes (an engine's only: the torch path is timed each time).
        self.calibrations = calibrations
        # A fast engine (linearize.engine) runs plain decoding; None: the model itself.
        self.engine = engine
        self.sampler = Sampler(config.sampling(), device=model.device)
        self.rule = acceptance_rule(config.resolved_acceptance())
        self.options = config.acceptance_options()
        self.calibration = calibration
        self.planner: Planner | None = None
        self.setting: Setting | None = None
        self.history: list[int] = []
        self.passes = 0
        self.emitted_per_pass: list[int] = []
        self.prefill_s = self.calibration_s = 0.0

    def _ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.model.device)

    @torch.no_grad()
    def prefill(self, prompt: list[int], state: ModelState | None = None) -> list[int]:
        """Feed the prompt, sample the first token. ``state``, if given, already holds the
        prompt's first ``state.pos`` tokens (a cached prefix): only the rest is fed."""
        start = time.perf_counter()
        if self.engine is not None:
            if state is not None:
                raise ValueError("a cached prefix state is a torch state: use the torch engine")
            logits = self.engine.prefill(list(prompt))
            return self.prefilled(prompt, self.engine.last_hidden, None, logits, start=start)
        done = 0 if state is None else state.pos
        if not 0 <= done < len(prompt):
            raise ValueError(f"a prefix state of {done} tokens for a {len(prompt)}-token prompt")
        last, state = self.model.prefill(self._ids(prompt[done:]), state=state)
        return self.prefilled(prompt, last[0], state, start=start)

    @torch.no_grad()
    def prefilled(
        self,
        prompt: list[int],
        last: torch.Tensor,
        state: ModelState | None,
        logits: torch.Tensor | None = None,
        *,
        start: float | None = None,
    ) -> list[int]:
        """Sample the first token of a prompt fed elsewhere (e.g. batched with other prompts):
        ``last: [D]`` its last hidden state, ``state`` the state after it (``None``: an engine
        holds it), ``logits`` (``[V]``) the LM head's on ``last`` unless given; ``start``: when
        feeding began (for ``prefill_s``)."""
        start = time.perf_counter() if start is None else start
        self.history = list(prompt)
        self.state = state
        if logits is None:
            logits = self.model.lm_head(last)
        self.root = self.sampler.sample(self.sampler.probs(logits, prompt))
        self.prefill_s = time.perf_counter() - start
        if self.proposer is not None:
            start = time.perf_counter()
            self.proposer.start(prompt, last)
            self._plan(last)
            self.calibration_s = time.perf_counter() - start
        return [self.root]

    def _plan(self, last: torch.Tensor) -> None:
        config, proposer = self.config, self.proposer
        mode = config.speculative
        if mode == "medusa" and config.tree != "auto":
            fixed = fixed_plan(mode, paths=tree_spec(config.tree))
        elif mode != "medusa" and config.gamma is not None:
            fixed = fixed_plan(mode, gamma=config.gamma)
        else:
            fixed = None
            if self.calibration is None:
                self.calibration = self._calibrate(last)
        accuracy = None
        if mode == "medusa":
            accuracy = proposer.heads.rank_accuracy
            if accuracy is None:
                logger.warning("Medusa heads carry no measured accuracies: assuming typical ones")
                accuracy = TYPICAL_RANK_ACCURACY
            accuracy = [list(row) for row in accuracy[: len(proposer.heads)]]
        # The first plan weighs speculation against plain decoding at its fastest: on an engine
        # built for exact speculation (fp32 arithmetic), a step with int8 arithmetic.
        calibration = self.calibration
        faster = (
            fixed is None
            and self.engine is not None
            and calibration.fast_step is not None
            and calibration.fast_step < calibration.step
        )
        self.planner = Planner(
            mode, calibration.fastest() if faster else calibration, accuracy, fixed=fixed
        )
        plan = self.planner.choose()
        if faster:
            if plan.speculating:  # re-plans: the fallback is a step at the trees' arithmetic
                self.planner.calibration = calibration
            else:
                self.engine.use_step_arithmetic("int8")
                plan.reason += "; plain steps with int8 arithmetic"
                self.planner.history[-1] = plan.to_dict()
        self._use(plan)

    def _calibrate(self, last: torch.Tensor) -> Calibration:
        proposer, mode = self.proposer, self.config.speculative
        if mode == "medusa":
            sizes, overhead = TREE_SIZES, lambda: proposer.read_heads(last)
        else:
            sizes = (1, 2, 3, 5, 9)
            if mode == "draft":
                ids = self._ids([self.root])
                overhead = lambda: proposer.draft(ids, state=proposer.state)
            else:
                overhead = lambda: proposer.lookup([*self.history, self.root], 8)
        # The most tokens a pass can give: a tree's depth + 1 (Medusa: one node per head and
        # the root; a chain: its nodes), whatever the accuracies turn out to be.
        ceiling = 1 + len(proposer.heads) if mode == "medusa" else max(sizes)
        options = {"chain": mode != "medusa", "overhead": overhead, "ceiling": ceiling}
        store = self.calibrations if self.engine is not None else None
        if store is not None:
            key = calibration_key(self.engine, proposer, list(sizes), options["chain"], ceiling)
            if (stored := store.get(key)) is not None:
                return stored
        logger.info(
            "timing plain steps against %s verification of %s tokens on this machine (once; "
            "the first time on an engine also builds its tree graphs)",
            mode,
            "/".join(map(str, sizes)),
        )
        if self.engine is None:
            return calibrate(self.model, self.state, self.root, sizes, **options)
        calibration = calibrate_engine(self.engine, self.root, sizes, **options)
        if store is not None:
            store.put(key, calibration)
        return calibration

    def _use(self, plan) -> None:
        self.setting = plan.setting() if plan.speculating else None
        logger.debug("speculation %s: %s nodes (%s)", plan.mode, plan.nodes, plan.reason)

    @torch.no_grad()
    def step(self) -> list[int]:
        """Feed the root, emit the next token(s)."""
        if self.setting is None:
            if self.engine is not None:
                with one_torch_thread():  # the sampling between the engine's runs
                    return self.advance(self.engine.step(self.root), None)
            logits, state = self.model(self._ids([self.root]), state=self.state)
            return self.advance(logits[0, -1], state)
        self.passes += 1
        # 1. propose
        proposal = self.proposer.propose(self.root, self.history, self.sampler, self.setting)
        # 2. verify
        if self.engine is not None:
            logits, hidden = self.engine.forward_tree(list(proposal.tokens), proposal.tree)
            logits, hidden = logits[None], hidden[None]
        else:
            logits, hidden, drafts = self.model.forward_tree(
                self._ids(proposal.tokens), proposal.tree, self.state
            )
        # 3. accept
        verification = Verification(
            proposal.tree,
            proposal.tokens,
            logits[0],
            self.history,
            self.sampler,
            proposal.proposals,
        )
        acceptance = self.rule(verification, self.options)
        # 4. commit
        if self.engine is not None:
            self.engine.commit(acceptance.path)
        else:
            path = torch.tensor(acceptance.path, dtype=torch.long)
            self.state = self.model.commit(self.state, drafts, path)
        self.proposer.observe(proposal, acceptance, hidden[0])
        accepted = [proposal.tokens[i] for i in acceptance.path]
        self.history.extend(accepted)
        self.root = acceptance.next_token
        self.emitted_per_pass.append(len(accepted))
        # 5. re-plan from what was accepted
        depth = int(proposal.tree.depths.max())
        plan = self.planner.observe(len(accepted) - 1, depth)
        if plan is not None:
            self._use(plan)
        return [*accepted[1:], self.root]

    @property
    def speculating(self) -> bool:
        """Whether the next ``step`` is a speculative one (else a plain step: ``advance``)."""
        return self.setting is not None

    def advance(self, logits: torch.Tensor, state: ModelState | None) -> list[int]:
        """A plain step whose forward pass ran elsewhere (e.g. batched with other sequences):
        ``logits: [V]`` after feeding ``self.root``, ``state`` the state after it (``None``:
        held elsewhere: a fast engine, or a server's batch of rows)."""
        self.passes += 1
        self.state = state
        self.history.append(self.root)
        self.root = self.sampler.sample(self.sampler.probs(logits, self.history))
        self.emitted_per_pass.append(1)
        return [self.root]

    @property
    def mean_accepted(self) -> float:
        n = len(self.emitted_per_pass)
        return sum(self.emitted_per_pass) / n if n else 0.0


def iter_generate(
    model: Decoder,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    heads: MedusaHeads | None = None,
    draft: Decoder | None = None,
    calibration: Calibration | None = None,
    engine: Any = None,
    calibrations: CalibrationStore | None = None,
) -> Generator[str, None, GenerationResult]:
    """Yield text deltas as they are produced; return the :class:`GenerationResult`.

    With no tokenizer (tiny test models) nothing is yielded and ``text`` is ``None``.
    ``engine`` (from :func:`linearize.engine.build_engine`) runs plain decoding fast;
    ``calibrations``: speculation's timings on an engine kept across processes (read, else
    measured and stored; ``calibration``, when given, is used as it is).
    """
    config = (config or GenerationConfig()).validate()
    prompt_ids = encode_prompt(model.tokenizer, prompt, chat=config.chat)
    if config.stop and model.tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model has none")
    config = check_context(model, len(prompt_ids), config)
    proposer = PROPOSERS[config.speculative](model, config, heads, draft)
    output = Output(model, config)
    decoding = Decoding(model, config, proposer, calibration, engine, calibrations)
    start = time.perf_counter()
    chunk = decoding.prefill(prompt_ids)
    while output.reason is None:
        for token in chunk:
            if delta := output.push(token):
                yield delta
            if output.reason is not None:
                break
        else:
            chunk = decoding.step()
    seconds = time.perf_counter() - start
    if tail := output.finish():
        yield tail
    planner = decoding.planner
    return GenerationResult(
        token_ids=output.tokens,
        text=output.text,
        prompt_ids=prompt_ids,
        finish_reason=output.reason,
        forward_passes=decoding.passes,
        draft_passes=getattr(proposer, "passes", 0),
        mean_accepted=decoding.mean_accepted,
        seconds=seconds,
        prefill_s=decoding.prefill_s,
        calibration_s=decoding.calibration_s,
        plan=None if planner is None else planner.plan.to_dict(),
        plans=[] if planner is None else planner.history,
        calibration=decoding.calibration,
        arithmetic=getattr(engine, "step_accuracy", None),
    )


def generate(
    model: Decoder,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    heads: MedusaHeads | None = None,
    draft: Decoder | None = None,
    calibration: Calibration | None = None,
    on_text: Callable[[str], None] | None = None,
    engine: Any = None,
    calibrations: CalibrationStore | None = None,
) -> GenerationResult:
    """Generate from one prompt (text, or token ids); ``on_text`` receives text deltas (the
    other arguments: :func:`iter_generate`'s)."""
    steps = iter_generate(
        model,
        prompt,
        config,
        heads=heads,
        draft=draft,
        calibration=calibration,
        engine=engine,
        calibrations=calibrations,
    )
    while True:
        try:
            delta = next(steps)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(delta)


def stream(
    model: Decoder,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    **options: Any,
) -> Iterator[str]:
    """The text deltas of :func:`generate` as an iterator."""
    yield from iter_generate(model, prompt, config, **options)
