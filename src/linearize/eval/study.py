"""The paper's study on a real LLM: every causal linear attention, same training budget.

Each variant linearizes a fresh copy of the base model (every causal attention of the registry,
and each ablation of the augmented layer: local only / local+global / local+conv / full), trains
it with the same number of tokens (attention transfer then fine-tuning when the variant has new
parameters, fine-tuning alone otherwise), and is scored on held-out text. Two controls: the
softmax original untrained, and the softmax original fine-tuned with the same budget (training
on the corpus helps any model; the control tells that apart from what the attention costs).

The study is resumable: each variant writes ``<out>/variants/<variant>.json`` when done, and a
rerun skips variants that have one. The table (markdown + CSV) and the bar plot are rebuilt from
those files at the end.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from linearize.config import Config, option
from linearize.data import split_tokens
from linearize.layers.attention import has_new_parameters
from linearize.layers.config import ABLATIONS, attention_config, list_attentions
from linearize.models import linearize, load
from linearize.train.perplexity import PerplexityConfig, perplexity

logger = logging.getLogger(__name__)

ORIGINAL = "softmax"
FINETUNED = "softmax+finetune"
# The held-out split of each built-in training corpus.
EVAL_SPLITS = {"austen": "austen:eval"}

Event = Callable[[dict[str, Any]], None]


def study_variants() -> dict[str, dict[str, Any] | None]:
    """Variant name → attention spec (``None``: keep softmax), in table order."""
    variants: dict[str, dict[str, Any] | None] = {ORIGINAL: None, FINETUNED: None}
    for name in list_attentions():
        if name in ("softmax", "augmented") or not attention_config(name).is_causal:
            continue
        variants[name] = {"name": name}
    for ablation, options in ABLATIONS.items():
        variants[f"augmented:{ablation}"] = {"name": "augmented", **options}
    return variants


@dataclass
class StudyConfig(Config):
    """One study: a base model, a training corpus and budget, a held-out set."""

    model: str = option("the base (softmax) model", "smollm2-135m")
    data: str = option("training corpus: a built-in name or a path", "austen")
    eval_data: str | None = option("held-out text (default: the corpus's eval split)", None)
    tokens: int = option("training tokens per variant", 49_152)
    eval_tokens: int = option("held-out tokens scored per variant", 8192)
    window: int = option("perplexity window", 1024)
    block_size: int = option("training sequence length", 512)
    batch_size: int = option("sequences per optimizer step", 4)
    lr: float = option("fine-tuning learning rate", 1e-4)
    seed: int = option("random seed", 0)
    variants: list[str] | None = option("variants to run (default: all)", None)
    out: str = option("output folder", "results/study")

    def validate(self) -> StudyConfig:
        if self.eval_data is None and self.data not in EVAL_SPLITS:
            raise ValueError(
                f"no held-out split is known for {self.data!r} (known: {sorted(EVAL_SPLITS)}): "
                "pass --eval-data"
            )
        for name in ("tokens", "eval_tokens", "block_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        known = study_variants()
        for v in self.variants or []:
            if v not in known:
                raise ValueError(f"unknown variant {v!r}; valid: {list(known)}")
        return self

    @property
    def held_out(self) -> str:
        return self.eval_data or EVAL_SPLITS[self.data]

    def selected(self) -> dict[str, dict[str, Any] | None]:
        variants = study_variants()
        chosen = self.variants or list(variants)
        return {name: variants[name] for name in variants if name in chosen}


def variant_path(out: str | Path, variant: str) -> Path:
    safe = variant.replace(":", "-").replace("+", "_")
    return Path(out) / "variants" / f"{safe}.json"


def _train_config(config: StudyConfig, spec: dict[str, Any] | None, model: Any):
    from linearize.train.config import TrainConfig

    options = {k: v for k, v in (spec or {}).items() if k != "name"}
    return TrainConfig(
        model=config.model,
        attention=None if spec is None else spec["name"],
        attention_options=options,
        stage="both" if has_new_parameters(model) else "finetune",
        data=config.data,
        tokens=config.tokens,
        block_size=config.block_size,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        eval_every=0,
        checkpoint_every=0,
        device="auto",
    ).validate()


def run_variant(
    config: StudyConfig,
    name: str,
    spec: dict[str, Any] | None,
    tokens: tuple[Tensor, Tensor],
    callback: Event | None = None,
) -> dict[str, Any]:
    """Linearize, train on ``tokens[0]`` and score on ``tokens[1]`` one variant; returns its
    result row."""
    from linearize.train.trainer import Trainer

    model = load(config.model)
    if spec is not None:
        linearize(model, spec)
    trained, seconds = 0, 0.0
    if name != ORIGINAL:
        train = _train_config(config, spec, model)
        start = time.perf_counter()
        model = Trainer(model, train, tokens[0], None, callback=callback).fit().model
        trained, seconds = train.tokens, time.perf_counter() - start
    ppl = perplexity(
        model, tokens[1], PerplexityConfig(window=config.window, tokens=config.eval_tokens)
    )
    return {
        "variant": name,
        "attention": "softmax" if spec is None else spec["name"],
        "options": {k: v for k, v in (spec or {}).items() if k != "name"},
        "train_tokens": trained,
        "train_seconds": seconds,
        "ppl": ppl.ppl,
        "nll": ppl.nll,
        "eval_tokens": ppl.tokens,
        "eval_seconds": ppl.seconds,
    }


def run_study(config: StudyConfig, callback: Event | None = None) -> list[dict[str, Any]]:
    """Run every selected variant not done yet; return all rows (with ``ratio`` to the
    original's perplexity) and write the table, CSV and plot into ``config.out``."""
    config.validate()
    out = Path(config.out)
    tokens = None
    for name, spec in config.selected().items():
        path = variant_path(out, name)
        if path.exists():
            logger.info("variant %s: done (%s)", name, path)
            continue
        if tokens is None:
            tokenizer = load(config.model).tokenizer
            tokens = split_tokens(
                config.data, tokenizer, config.eval_tokens, held_out=config.held_out
            )
        if callback is not None:
            callback({"event": "variant", "variant": name})
        row = run_variant(config, name, spec, tokens, callback)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": asdict(config), "row": row}, indent=1) + "\n")
        tmp.replace(path)
        logger.info("variant %s: ppl %.3f", name, row["ppl"])
    return collect(config)


def collect(config: StudyConfig) -> list[dict[str, Any]]:
    """The rows of the finished variants, in table order, with the ratio to the original."""
    rows = []
    for name in config.selected():
        path = variant_path(config.out, name)
        if path.exists():
            rows.append(json.loads(path.read_text())["row"])
    base = next((r["ppl"] for r in rows if r["variant"] == ORIGINAL), None)
    for r in rows:
        r["ratio"] = None if base is None else r["ppl"] / base
    return rows


def write_outputs(config: StudyConfig, rows: list[dict[str, Any]], command: str) -> Path:
    """``study.json`` record (+ ``study.md`` table, ``study.png`` bar plot) and ``study.csv``."""
    from linearize.bench.report import save_results

    out = Path(config.out)
    path = save_results(out, "study", "study", rows, command, {"config": asdict(config)})
    columns = ["variant", "attention", "train_tokens", "ppl", "ratio", "nll", "train_seconds"]
    with (out / "study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
