"""Speculative decoding speed: plain vs Medusa trees vs draft models, greedy, batch 1.

The protocol of the paper's Table 8: a fixed set of prompts, greedy decoding, batch 1, tokens per
second with and without speculation. Every method's output is checked against plain decoding
token for token (greedy speculation must not change it); ``identical`` reports the check. Timings
include the prefill; each method's calibration (hardware-aware choice) is measured once on a
warm-up call and reused, and reported separately. Methods take turns prompt by prompt.

On the onnx engine (``engine="onnx"``) every method runs on one engine with fp32 arithmetic, the
arithmetic under which a tree pass and a step compute alike (so greedy speculation is exact);
a second row of plain decoding on the engine's faster int8 arithmetic (what ``generate`` uses
without speculation) shows what speculation must beat there, and the planner weighs it so: a
method it leaves off from the start decodes plainly with int8 arithmetic, and is checked against
that row. ``context`` puts a document before
every prompt: decoding at long context, where a step reads long rings or caches and a tree pass
reads them once for all its nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from linearize.bench.report import engine_label
from linearize.data import eval_tokens, source_tokens
from linearize.generation.config import GenerationConfig
from linearize.generation.decode import GenerationResult, generate
from linearize.generation.medusa import MedusaHeads, load_heads, save_heads
from linearize.generation.medusa_train import MedusaTrainConfig, train_medusa
from linearize.generation.speculative import truncated_draft
from linearize.models.decoder import Decoder

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue in simple terms.",
    "List five tips for staying productive while working from home:\n1.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The history of the printing press begins in",
    "Dear Mr. Darcy,\n\nI write to you concerning",
    "Q: What are the main differences between a cat and a dog as pets?\nA:",
)


@dataclass
class Method:
    """One benchmarked configuration: a name, a setting label and the generation options."""

    method: str
    setting: str
    config: dict[str, Any]
    options: dict[str, Any]
    # The engine's matmul arithmetic ("fp32" on the torch reference).
    arithmetic: str = "fp32"


def _methods(
    model: Decoder,
    heads: MedusaHeads | None,
    trees: Sequence[str],
    draft_layers: Sequence[int],
    lookup: bool,
    engines: dict[str, Any],
) -> list[Method]:
    """``engines``: by arithmetic, the engine each method runs on (``{}``: the torch reference);
    speculation runs on the fp32 one."""
    on = {"engine": engines["fp32"]} if engines else {}
    methods = [Method("plain", "-", {}, dict(on))]
    if "int8" in engines:
        methods.append(Method("plain", "int8 arithmetic", {}, {"engine": engines["int8"]}, "int8"))
    if heads is not None:
        for tree in trees:
            config = {"speculative": "medusa", "tree": tree}
            methods.append(Method("medusa", tree, config, {"heads": heads, **on}))
    if lookup:
        methods.append(Method("lookup", "auto γ", {"speculative": "lookup"}, dict(on)))
    for layers in draft_layers:
        draft = truncated_draft(model, layers)
        methods.append(
            Method(
                "draft",
                f"{layers} layers, auto γ",
                {"speculative": "draft"},
                {"draft": draft, **on},
            )
        )
    return methods


def load_target(model: Decoder | str, attention: str | dict | None) -> Decoder:
    """``model`` loaded if a name or path, linearized with ``attention`` ('none': as loaded)."""
    if not isinstance(model, str):
        return model
    import linearize

    loaded = linearize.load(model)
    if attention not in (None, "none"):
        linearize.linearize(loaded, attention)
    return loaded.eval()


def train_heads(
    model: Decoder,
    config: MedusaTrainConfig,
    save_to: str | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> MedusaHeads:
    """Medusa heads trained on Austen for ``model`` (scored on held-out Pride and Prejudice),
    the training time in ``metrics["train"]["seconds"]``; saved to ``save_to`` if given."""
    start = time.perf_counter()
    with torch.enable_grad():
        heads = train_medusa(
            model,
            source_tokens("austen", model.tokenizer),
            config,
            held_out=eval_tokens(model.tokenizer, config.eval_tokens),
            progress=progress,
        )
    heads.metrics["train"]["seconds"] = time.perf_counter() - start
    if save_to:
        save_heads(heads, save_to)
    return heads


def heads_summary(heads: MedusaHeads) -> list[str]:
    """Per head: held-out top-1/top-5 accuracy against the text and agreement with the model."""
    ev = heads.metrics.get("eval", {})
    if not ev:
        return []
    lines = ["Medusa heads (held-out P&P): top-1/top-5 vs text, top-1 agreement with the model"]
    for m in range(len(heads)):
        lines.append(
            f"  head {m}: {ev['top1'][m]:.3f} / {ev['top5'][m]:.3f}, "
            f"agreement {ev['top1_agreement'][m]:.3f}"
        )
    return lines


def _prepare(
    model: Decoder, method: Method, prompt: str, base: GenerationConfig
) -> tuple[GenerationConfig, dict[str, Any], float]:
    """The method's config and generate options; a warm-up call measures the machine once for
    the hardware-aware choice (reused by every prompt)."""
    config = GenerationConfig(**{**base.to_dict(), **method.config}).validate()
    options, calibration_s = dict(method.options), 0.0
    if method.method != "plain":
        warm = GenerationConfig(**{**config.to_dict(), "max_new_tokens": 2})
        start = time.perf_counter()
        options["calibration"] = generate(model, prompt, warm, **method.options).calibration
        calibration_s = time.perf_counter() - start
    return config, options, calibration_s


def _row(method: Method, results: list[GenerationResult], references, calibration_s: float):
    """``references``: plain decoding's outputs by arithmetic. A speculative method whose planner
    left speculation off from the start decoded with the engine's int8 arithmetic."""
    outputs = [r.token_ids for r in results]
    passes = sum(r.forward_passes for r in results)
    arithmetic = sorted({r.arithmetic or method.arithmetic for r in results})
    arithmetic = arithmetic[0] if len(arithmetic) == 1 else "/".join(arithmetic)
    return {
        "method": method.method,
        "setting": method.setting,
        "prompt_tokens": sum(len(r.prompt_ids) for r in results) / len(results),
        "tokens": sum(len(o) for o in outputs),
        "tokens_per_s": sum(len(o) for o in outputs)
        / sum(r.seconds - r.calibration_s for r in results),
        "decode_tokens_per_s": sum(len(o) - 1 for o in outputs)
        / sum(r.seconds - r.prefill_s - r.calibration_s for r in results),
        "forward_passes": passes,
        "mean_accepted": sum(len(o) - 1 for o in outputs) / max(1, passes),
        "draft_passes": sum(r.draft_passes for r in results),
        "identical": outputs == references.get(arithmetic),
        "arithmetic": arithmetic,
        "chosen": sorted({_chosen(r) for r in results}),
        "calibration_s": calibration_s,
    }


def _chosen(result: GenerationResult) -> str:
    """The setting used: ``"16 nodes"`` / ``"γ=3"``, with re-plans as ``first → last``."""

    def label(plan: dict) -> str:
        if plan["nodes"] == 1:
            return "off"
        return f"{plan['nodes']} nodes" if plan["mode"] == "medusa" else f"γ={plan['gamma']}"

    if result.plan is None:
        return "plain"
    if result.plan["reason"] == "set by the user":
        return "fixed"
    first, last = label(result.plans[0]), label(result.plan)
    return first if first == last else f"{first} → {last}"


def run_speculative_benchmark(
    model: Decoder | str,
    prompts: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 64,
    trees: Sequence[str] = ("tree-2", "tree-4", "tree-8", "tree-16", "auto"),
    draft_layers: Sequence[int] | None = None,
    lookup: bool = True,
    heads: MedusaHeads | None = None,
    attention: str | dict | None = None,
    chat: bool | None = None,
    engine: str = "torch",
    context: str = "",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per method: tokens/s (prefill included, calibration excluded), decode tokens/s,
    mean accepted tokens per target pass, speedup over plain, and whether the output equals
    plain decoding. ``model`` may be a name or path (loaded, then linearized with ``attention``
    if given); Medusa rows need ``heads`` (else heads saved in the path).
    ``draft_layers``: truncated drafts to try (default: a quarter of the layers); ``chat``:
    format prompts with the chat template (default: when the tokenizer has one); ``engine``:
    ``torch``, ``onnx`` or ``auto`` (:func:`linearize.engine.resolve_engine`), its ``threads``;
    ``context``: a document put before every prompt (a blank line between)."""
    from linearize.engine import build_engine, resolve_engine
    from linearize.generation.streaming import encode_prompt

    source = model
    model = load_target(model, attention)
    if heads is None and isinstance(source, str):
        heads = load_heads(source)
    if draft_layers is None:
        total = model.config.num_layers
        draft_layers = (max(1, total // 4),) if total >= 4 else ()
    prompts = [f"{context}\n\n{p}" if context else p for p in prompts or DEFAULT_PROMPTS]
    if chat is None:
        chat = getattr(model.tokenizer, "chat_template", None) is not None
    base = GenerationConfig(max_new_tokens=max_new_tokens, chat=chat)
    engines = {}
    if resolve_engine(engine, model) != "torch":
        longest = max(len(encode_prompt(model.tokenizer, p, chat=chat)) for p in prompts)
        # Room for the new tokens and a tree's nodes past the last one.
        room = longest + max_new_tokens + 64
        # Both with float32 rings: a method the planner leaves off decodes in int8 arithmetic
        # on the fp32 engine's state, and is checked against the int8 engine's plain tokens
        # (the default int8 engine's float16 rings are bench decode's).
        engines = {
            arithmetic: build_engine(
                "onnx",
                model,
                max_context=room,
                threads=threads,
                accuracy=arithmetic,
                kv_type="float32",
            )
            for arithmetic in ("fp32", "int8")
        }
    methods = _methods(model, heads, trees, draft_layers, lookup, engines)
    prepared = [_prepare(model, m, prompts[0], base) for m in methods]
    results: list[list[GenerationResult]] = [[] for _ in methods]
    # Methods take turns on each prompt, so a machine whose load drifts (a shared CPU) biases
    # no method in particular.
    for i, prompt in enumerate(prompts):
        if progress is not None:
            progress(f"prompt {i + 1}/{len(prompts)}")
        for (config, options, _), out in zip(prepared, results, strict=True):
            out.append(generate(model, prompt, config, **options))
    # Plain decoding's tokens at each arithmetic: a method is checked against the one it ran.
    references = {
        m.arithmetic: [r.token_ids for r in out]
        for m, out in zip(methods, results, strict=True)
        if m.method == "plain"
    }
    rows = [
        _row(m, out, references, p[2]) for m, out, p in zip(methods, results, prepared, strict=True)
    ]
    plain = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / plain
        row["engine"] = "torch" if not engines else "onnx"
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| method | setting | engine | tokens/s | decode tok/s | speedup | mean accepted | "
        "passes | identical to plain | chosen |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {engine_label(r)} | {r['tokens_per_s']:.2f} | "
            f"{r['decode_tokens_per_s']:.2f} | {r['speedup']:.2f}× | {r['mean_accepted']:.2f} | "
            f"{r['forward_passes']} | {'yes' if r['identical'] else 'NO'} | "
            f"{'; '.join(r['chosen'])} |"
        )
    return "\n".join(lines)
