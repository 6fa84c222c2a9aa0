"""Wide layers: a few sliding-window layers whose window spans the original's trained positions.

A linearized model recalls exact tokens only inside its windows (512 tokens by default); its
global part keeps a summary of the rest, not the tokens. A pretrained LLM fetches a far-back
token (a pass key, a name) through a few of its layers. Giving those layers a window as wide as
the original's trained positions (SmolLM2: 8,188 + 4 sinks = 8,192) brings exact recall back up
to that distance, and the state stays fixed: it grows with the window, never with the text.

Which layers: :func:`choose_wide_layers` widens each sliding-window layer alone on recall probes
(a number stated once inside unrelated filler text, asked for at the end; text of its own, not
the passkey evaluation's) and keeps the layers whose widening lowers the number's loss the most.
"""

from __future__ import annotations

import logging
import random

import torch
from torch import Tensor
from tqdm.auto import tqdm

from linearize.layers.attention import Attention
from linearize.models.convert import set_layer_options
from linearize.models.decoder import Decoder

logger = logging.getLogger(__name__)

# The wide layers' window by default: SmolLM2's 8,192 trained positions less 4 sinks (kept inside
# each model's trained positions by :func:`wide_window`). Passkey at 8,000 tokens, trained by the
# default recipe: 9/10 like the original; with 4,092 a needle more than ~4.4k tokens back is lost.
DEFAULT_WIDE_SIZE = 8188

_FILLER = "Rain fell on the old town all day. The river ran past the mill and on to the sea. "
_NEEDLE = "Write this down: the secret code is {key}. "
_QUESTION = "\nQuestion: what is the secret code? Answer: the secret code is"


def can_widen(model: Decoder, layer: int) -> bool:
    """Whether ``layer`` has a sliding window that :func:`widen` can widen."""
    config = model.config.attention_config(layer)
    return config.kind == "linear" and config.window == "sliding" and config.size > 0


def wide_candidates(model: Decoder, size: int) -> list[int]:
    """The layers a window of ``size`` would widen."""
    return [
        i
        for i in range(len(model.layers))
        if can_widen(model, i) and size > model.config.attention_config(i).size
    ]


def wide_window(model: Decoder, requested: int = 0) -> int | None:
    """The wide layers' window for ``requested`` tokens (0: the widest), kept inside the trained
    positions; ``None`` when the model has no sliding-window layer."""
    layers = [i for i in range(len(model.layers)) if can_widen(model, i)]
    if not layers:
        return None
    widest = min(wide_size(model, i) for i in layers)
    return widest if requested == 0 else min(requested, widest)


def wide_size(model: Decoder, layer: int) -> int:
    """The widest window whose sinks + tokens stay inside the model's trained positions."""
    config = model.config.attention_config(layer)
    return model.config.max_position_embeddings - config.sinks


def widen(model: Decoder, layers: list[int], size: int) -> Decoder:
    """Give ``layers`` a sliding window of ``size`` tokens, in place, keeping every parameter
    (pretrained and trained); returns ``model``."""
    for i in layers:
        if not 0 <= i < len(model.layers) or not can_widen(model, i):
            raise ValueError(
                f"layer {i} cannot be widened: only linear attentions with a sliding window can "
                f"(this model has {len(model.layers)} layers)"
            )
        if size < model.config.attention_config(i).size:
            raise ValueError(f"a wide window must not be narrower than the layer's, got {size}")
    for i in layers:
        set_layer_options(model, i, {"size": size})
    if layers:
        logger.info("widened the windows of layers %s to %d tokens", layers, size)
    return model


def recall_probes(tokenizer, length: int, count: int, seed: int = 0) -> list[tuple[Tensor, int]]:
    """``count`` probes of about ``length`` tokens: ``(ids, n)``, the last ``n`` ids the number."""
    rng = random.Random(seed)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    unit, question = encode(_FILLER), encode(_QUESTION)
    probes = []
    for j in range(count):
        key = str(rng.randrange(10_000, 100_000))
        needle, answer = encode(_NEEDLE.format(key=key)), encode(f" {key}")
        room = max(len(unit), length - len(needle) - len(question) - len(answer))
        filler = (unit * (room // len(unit) + 1))[:room]
        # Spread over the first half: the needle always lies beyond a narrow window.
        cut = round((j + 0.5) / (2 * count) * (room // len(unit))) * len(unit)
        ids = filler[:cut] + needle + filler[cut:] + question + answer
        probes.append((torch.tensor(ids), len(answer)))
    return probes


@torch.no_grad()
def recall_loss(model: Decoder, probes: list[tuple[Tensor, int]], start: int = 0, inputs=None):
    """Mean negative log-likelihood of the probes' numbers (summed over each number's tokens).
    With ``inputs`` (:func:`_layer_inputs`: each probe's input to every layer on the first
    tokens and on the rest, and every layer's state after the first tokens, which no widening
    changes) only the layers from ``start`` on run again, and only on the rest."""
    total = 0.0
    for j, (ids, n) in enumerate(probes):
        if inputs is None:
            hidden, _ = model.forward_hidden(ids[None].to(model.device))
        else:
            heads, tails, states = inputs[j]
            x = tails[start]
            if start < len(model.layers):
                # Layer ``start`` (perhaps just widened) builds its own state on the prefix; the
                # later layers' states there are the ones recorded.
                layer = model.layers[start]
                state = None if heads is None else layer(heads[start], None, "auto")[1]
                x, _ = layer(x, state, "auto")
                for layer, state in zip(
                    model.layers[start + 1 :], states[start + 1 :], strict=True
                ):
                    x, _ = layer(x, state, "auto")
            hidden = model.norm(x)
        logp = model.lm_head(hidden[0, -n - 1 : -1]).float().log_softmax(-1)
        total -= float(logp.gather(-1, ids[-n:, None].to(logp.device)).sum())
    return total / len(probes)


@torch.no_grad()
def _layer_inputs(model: Decoder, probes: list[tuple[Tensor, int]], prefix: int) -> list[tuple]:
    """Each probe's input to every layer (then the last layer's output) on its first ``prefix``
    tokens (``None`` when ``prefix`` is 0) and on the rest, and every layer's state after the
    first ``prefix`` tokens: one pass, in two pieces."""
    out = []
    for ids, _ in probes:
        pieces: list[list[Tensor]] = []
        hooks = [
            layer.register_forward_pre_hook(
                lambda m, args, pieces=pieces: pieces[-1].append(args[0])
            )
            for layer in model.layers
        ]
        hooks.append(
            model.layers[-1].register_forward_hook(
                lambda m, args, output, pieces=pieces: pieces[-1].append(output[0])
            )
        )
        ids = ids[None].to(model.device)
        try:
            state = None
            if prefix:
                pieces.append([])
                _, state = model.forward_hidden(ids[:, :prefix])
            pieces.append([])
            model.forward_hidden(ids[:, prefix:], state=state)
        finally:
            for hook in hooks:
                hook.remove()
        heads = pieces[0] if prefix else None
        states = [None] * len(model.layers) if state is None else state.layers
        out.append((heads, pieces[-1], states))
    return out


def _unchanged_prefix(model: Decoder, candidates: list[int]) -> int:
    """How many first tokens no candidate's widening changes, in any layer: a query at ``t``
    sees every earlier token exactly while ``t < size + sinks`` of its sliding window."""
    configs = [model.config.attention_config(i) for i in candidates]
    return min(c.size + c.sinks for c in configs)


def choose_wide_layers(
    model: Decoder,
    count: int,
    size: int | None = None,
    *,
    length: int | None = None,
    probes: int = 2,
    seed: int = 0,
) -> list[int]:
    """``count`` sliding-window layers chosen greedily: each round adds the layer whose widening
    (to ``size``; default :func:`wide_window`), on top of those already chosen, lowers the recall
    probes' loss the most (layers recall together: one may help only once another is wide).
    Returns them in layer order; ``model`` is left as it was. The probes are ``length`` tokens
    long (default: 512, or 2.5 windows for windows wider than 204)."""
    if model.tokenizer is None:
        raise ValueError("choosing wide layers needs the model's tokenizer (recall probes)")
    size = wide_window(model) if size is None else size
    candidates = [] if size is None else wide_candidates(model, size)
    if count < 0 or count > len(candidates):
        raise ValueError(
            f"wide layers: asked for {count}, this model has {len(candidates)} sliding-window "
            "layers to choose from"
        )
    if count == 0:
        return []
    widest = max(model.config.attention_config(i).size for i in candidates)
    length = max(512, int(2.5 * widest)) if length is None else length
    if length <= 2 * widest:
        raise ValueError(f"recall probes of {length} tokens do not reach past the windows")
    was_training = model.training
    model.eval()
    texts = recall_probes(model.tokenizer, length, probes, seed)
    prefix = min(_unchanged_prefix(model, candidates), min(len(ids) - n - 1 for ids, n in texts))
    chosen: list[int] = []
    replaced: list[tuple[int, Attention, dict]] = []
    losses: list[float] = []
    rounds = sum(len(candidates) - r for r in range(count))
    progress = tqdm(total=rounds, desc="choosing wide layers", leave=False)
    # The probes measure recall through the windows alone: a retained cache (a few far tokens
    # read in every layer) answers part of them in narrow layers and moves the choice to layers
    # that serve perplexity worse (the default recipe with the cache on while choosing: +1.7 %
    # over P&P's first 16k; docs/results.md), so it is off while they run.
    retaining = [i for i in range(len(model.layers)) if model.config.attention_config(i).retain]
    unretained = [(i, *set_layer_options(model, i, {"retain": 0})) for i in retaining]
    try:
        for _ in range(count):
            inputs = _layer_inputs(model, texts, prefix)
            if not losses:  # before any widening: the head on the last layer's output
                losses.append(recall_loss(model, texts, len(model.layers), inputs))
            trial = {}
            for i in (i for i in candidates if i not in chosen):
                old, options = set_layer_options(model, i, {"size": size})
                trial[i] = recall_loss(model, texts, i, inputs)
                model.layers[i].self_attn, model.config.attention[i] = old, options
                progress.update()
            best = min(trial, key=trial.__getitem__)
            chosen.append(best)
            replaced.append((best, *set_layer_options(model, best, {"size": size})))
            losses.append(trial[best])
    finally:
        progress.close()
        for i, old, options in [*reversed(replaced), *reversed(unretained)]:
            model.layers[i].self_attn, model.config.attention[i] = old, options
        model.train(was_training)
    logger.info(
        "wide layers %s (in the order chosen): recall loss %s",
        chosen,
        " → ".join(f"{loss:.2f}" for loss in losses),
    )
    return sorted(chosen)


def widen_best(model: Decoder, count: int, size: int = 0) -> list[int]:
    """Make ``count`` sliding-window layers wide (``size`` tokens; 0: the widest inside the
    trained positions, see :func:`wide_window`), at most as many as the model has: layers whose
    window is already that wide count (a trained model keeps its wide layers), the others are
    the narrow ones that recall best (:func:`choose_wide_layers`). Returns the model's wide
    layers (none for a model without a sliding window)."""
    if count < 0 or size < 0:
        raise ValueError(f"wide layers: count and size must be >= 0, got {count} and {size}")
    window = wide_window(model, size)
    if window is None:
        return []
    wide = [
        i
        for i in range(len(model.layers))
        if can_widen(model, i) and model.config.attention_config(i).size >= window
    ]
    more = min(count - len(wide), len(wide_candidates(model, window)))
    if wide and count:
        logger.info("layers %s already have windows of >= %d tokens", wide, window)
    if more > 0:
        chosen = choose_wide_layers(model, more, window)
        widen(model, chosen, window)
        wide += chosen
    return sorted(wide)
