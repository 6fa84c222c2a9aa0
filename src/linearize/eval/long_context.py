"""Long-context probes: perplexity by position on a streamed text, and passkey retrieval.

**Perplexity by position.** A linear model streams the whole text once, its state carried from
one segment of ``segment`` tokens to the next, and every target ``t`` (``1 ≤ t < T``) gets its
NLL with all of ``tokens[:t]`` as context. A model with softmax layers is scored instead in
non-overlapping windows of its ``max_position_embeddings`` (its trained range), for reference:
inside its first window both see the same context. Targets are grouped by their position ``t``
into buckets ``[edges[i], edges[i+1])`` (the last bucket runs to the end of the text); each bucket
reports ``exp(mean NLL)``. Short windows (today's protocol) never see what happens past them.

**Passkey.** A 5-digit number is hidden at a depth ``d ∈ [0, 1]`` inside filler text of a given
length; the model reads the prompt and answers greedily; a trial succeeds when the number appears
in the answer (Mohtashami & Jaggi 2023).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from linearize.models.decoder import Decoder
from linearize.train.perplexity import Span, in_window_positions, target_nlls, window_spans

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (0, 1024, 4096, 8192, 16384, 32768, 65536, 131072)
PASSKEY_LENGTHS = (1024, 4096, 8192, 16384, 32768)
# Greedy answer length: a 5-digit number and a little room.
ANSWER_TOKENS = 8
Progress = Callable[[int, int], None]


@dataclass
class Bucket:
    """Targets at positions ``[start, end)``: ``tokens`` of them, perplexity ``ppl``."""

    start: int
    end: int
    tokens: int
    ppl: float

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.start, "to": self.end, "tokens": self.tokens, "ppl": self.ppl}


def check_buckets(edges: Sequence[int]) -> tuple[int, ...]:
    """``edges`` as a tuple, or a ValueError if they are not ``>= 0`` and strictly increasing."""
    edges = tuple(int(e) for e in edges)
    if not edges:
        raise ValueError("buckets: give at least one edge, e.g. 0,1024,4096")
    if edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bucket edges must be >= 0 and strictly increasing, got {list(edges)}")
    return edges


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"0,1024,4096"`` → ``(0, 1024, 4096)``; a ValueError naming ``what`` otherwise."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def uses_softmax(model: Decoder) -> bool:
    return "softmax" in model.attention_names()


def softmax_windows(model: Decoder, T: int) -> list[Span] | None:
    """How a stream of ``T`` tokens is scored: a model with softmax layers in non-overlapping
    windows of its positions (these spans), a linear model on one carried state (``None``)."""
    if not uses_softmax(model):
        return None
    return window_spans(T, min(model.config.max_position_embeddings, T))


def scored_as(model: Decoder) -> str:
    """A stream result's ``scored_as``: ``"stream"`` or ``"windows of N"`` (see above)."""
    if uses_softmax(model):
        return f"windows of {model.config.max_position_embeddings}"
    return "stream"


@torch.no_grad()
def token_nlls(
    model: Decoder,
    tokens: Tensor,
    segment: int = 1024,
    form: str = "chunk",
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """``(positions [N], nll [N])`` of every scored target (see the module doc for which);
    ``progress(position of the last target scored, T − 1)`` after each segment or window."""
    T = len(tokens)
    if T < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {T}")
    windows = softmax_windows(model, T)
    if windows is not None:
        # A fresh window every max positions: each scores all but its first token.
        pieces = [(s.start, s.end, s.score_from) for s in windows]
    else:
        # One stream: segment [s, e) on the state after tokens[:s] scores tokens[s+1 : e+1].
        pieces = [(s, min(s + segment, T - 1), s + 1) for s in range(0, T - 1, segment)]
    carry = not uses_softmax(model)
    positions, nlls, state = [], [], None
    for start, end, score_from in pieces:
        ids = tokens[start:end][None].to(model.device)
        hidden, new_state = model.forward_hidden(ids, state=state, form=form)
        state = new_state if carry else None
        # hidden[j] predicts tokens[start + j + 1].
        first = score_from - start - 1
        last = end + 1 if carry else end
        targets = tokens[score_from:last].to(model.device)
        nlls.append(target_nlls(model, hidden[0, first : first + len(targets)], targets))
        positions.append(torch.arange(score_from, last))
        if progress is not None:
            progress(last - 1, T - 1)
    return torch.cat(positions), torch.cat(nlls)


def _short(tokens: int, edges: tuple[int, ...]) -> str:
    first = f"{edges[0]}–{edges[1] if len(edges) > 1 else 'end'}"
    return (
        f"the text ({tokens} tokens) is shorter than the first bucket ({first}) of --buckets "
        f"{','.join(map(str, edges))}: give a longer text or smaller --buckets"
    )


def check_length(tokens: int, edges: tuple[int, ...]) -> None:
    """A ValueError if a text of ``tokens`` tokens does not reach past the first bucket."""
    if tokens < (edges[1] if len(edges) > 1 else edges[0] + 2):
        raise ValueError(_short(tokens, edges))


def bucket_perplexity(positions: Tensor, nll: Tensor, edges: Sequence[int]) -> list[Bucket]:
    """Group per-target NLLs by position: every scored target lands in exactly one bucket."""
    edges = check_buckets(edges)
    end = int(positions.max()) + 1
    if end <= edges[0] or (len(edges) > 1 and end < edges[1]):
        raise ValueError(_short(end, edges))
    buckets = []
    bounds = list(zip(edges, [*edges[1:], max(end, edges[-1] + 1)], strict=True))
    for lo, hi in bounds:
        inside = (positions >= lo) & (positions < hi)
        count = int(inside.sum())
        if count:
            ppl = math.exp(float(nll[inside].mean()))
            buckets.append(Bucket(lo, min(hi, end), count, ppl))
    return buckets


def check_window_buckets(edges: Sequence[int], window: int) -> tuple[int, ...]:
    """:func:`check_buckets` for positions inside windows of ``window`` tokens: every edge must
    lie below ``window`` (a ValueError naming the edge otherwise)."""
    edges = check_buckets(edges)
    if edges[-1] >= window:
        raise ValueError(
            f"bucket edge {edges[-1]} is not inside a window of {window} tokens "
            f"(positions in a window run 1..{window - 1}): give edges below {window}"
        )
    return edges


class InWindowBuckets:
    """Perplexity by position inside the window, for windowed evaluation: pass it as
    ``on_targets`` (:func:`linearize.train.perplexity.perplexity`, :func:`linearize.eval.
    engine_perplexity.engine_perplexity`); :meth:`buckets` groups every scored target by how
    many of its window's tokens precede it. Each window starts fresh, so this is the stream's
    position measure averaged over every window: many more targets per bucket than one stream
    (49 windows of 1,024 put 24,892 targets in 516–1,024, one stream 508)."""

    def __init__(self, edges: Sequence[int], window: int) -> None:
        self.edges = check_window_buckets(edges, window)
        self.positions: list[Tensor] = []
        self.nlls: list[Tensor] = []

    def __call__(self, span: Span, nlls: Tensor) -> None:
        self.positions.append(in_window_positions(span, len(nlls)))
        self.nlls.append(nlls)

    def buckets(self) -> list[Bucket]:
        return bucket_perplexity(torch.cat(self.positions), torch.cat(self.nlls), self.edges)


@dataclass
class StreamResult:
    """The whole stream's perplexity and its buckets."""

    ppl: float
    nll: float
    tokens: int
    segment: int
    scored_as: str
    buckets: list[Bucket]

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["buckets"] = [b.to_dict() for b in self.buckets]
        return row


def stream_perplexity(
    model: Decoder,
    tokens: Tensor,
    edges: Sequence[int] = DEFAULT_BUCKETS,
    segment: int = 1024,
    form: str = "chunk",
    progress: Progress | None = None,
) -> StreamResult:
    """Perplexity by position of ``tokens: [T]`` (see the module doc)."""
    edges = check_buckets(edges)
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    check_length(len(tokens), edges)
    was_training = model.training
    model.eval()
    try:
        positions, nll = token_nlls(model, tokens, segment, form, progress)
    finally:
        model.train(was_training)
    mean = float(nll.mean())
    buckets = bucket_perplexity(positions, nll, edges)
    return StreamResult(math.exp(mean), mean, len(nll), segment, scored_as(model), buckets)


# --- passkey --------------------------------------------------------------------------------

_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str
    found: bool


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> Tensor:
    """Token ids (about ``length`` of them) with ``key`` at relative ``depth`` of the filler."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head, needle, tail = encode(_INTRO), encode(_NEEDLE.format(key=key)), encode(_QUESTION)
    unit = encode(_FILLER)
    room = length - len(head) - len(needle) - len(tail)
    if room < len(unit):
        raise ValueError(
            f"passkey length {length} is too short for the prompt (need > {length - room})"
        )
    filler = (unit * (room // len(unit) + 1))[:room]
    # Cut the filler at a sentence start so the needle is not glued inside a word.
    cut = round(depth * (room // len(unit))) * len(unit)
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    return torch.tensor(ids)


@torch.no_grad()
def greedy_answer(
    model: Decoder, ids: Tensor, max_new_tokens: int = 8, chunk: int = 1024
) -> Tensor:
    """Greedy continuation of ``ids: [T]``; the prompt is read ``chunk`` tokens at a time."""
    state, hidden = None, None
    for s in range(0, len(ids), chunk):
        hidden, state = model.forward_hidden(ids[None, s : s + chunk].to(model.device), state=state)
    out = []
    for _ in range(max_new_tokens):
        token = model.lm_head(hidden[:, -1]).argmax(-1)
        out.append(int(token))
        hidden, state = model.forward_hidden(token[:, None], state=state)
    return torch.tensor(out)


def passkey_depths(trials: int) -> list[float]:
    """``trials`` depths spread evenly over [0, 1]."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    return [0.5] if trials == 1 else [i / (trials - 1) for i in range(trials)]


def passkey(
    model: Decoder,
    lengths: Sequence[int] = PASSKEY_LENGTHS,
    depths: Sequence[float] = passkey_depths(5),
    seed: int = 0,
    on_trial: Callable[[PasskeyTrial], None] | None = None,
) -> tuple[dict[int, float], list[PasskeyTrial], list[int]]:
    """Accuracy per length, the trials, and the lengths skipped (past a softmax model's
    positions)."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: passkey needs one")
    for d in depths:
        if not 0 <= d <= 1:
            raise ValueError(f"depth must be in [0, 1], got {d}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"passkey lengths must be positive, got {list(lengths)}")
    limit = model.config.max_position_embeddings
    skipped = [n for n in lengths if uses_softmax(model) and n + ANSWER_TOKENS > limit]
    for n in skipped:
        logger.warning(
            "passkey length %d skipped: past this softmax model's %d positions", n, limit
        )
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    accuracy, trials = {}, []
    try:
        for n in (n for n in lengths if n not in skipped):
            hits = 0
            for depth in depths:
                key = str(rng.randrange(10_000, 100_000))
                ids = passkey_prompt(model.tokenizer, n, depth, key)
                answer = model.tokenizer.decode(greedy_answer(model, ids).tolist())
                trial = PasskeyTrial(n, depth, key, answer, key in answer)
                hits += trial.found
                trials.append(trial)
                if on_trial is not None:
                    on_trial(trial)
            accuracy[n] = hits / len(depths)
    finally:
        model.train(was_training)
    return accuracy, trials, skipped
