"""The main job: linearize a real LLM end to end, train it back, speculate, and report honestly.

Every step writes its result to ``<out>/steps/<step>.json`` (atomically) before the next starts,
so an interrupted demo rerun with the same options continues where it stopped; training runs
resume from their own checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from linearize.config import Config, option
from linearize.paths import atomic_write

logger = logging.getLogger(__name__)

PROMPTS = (
    "It is a truth universally acknowledged, that",
    "Mr. Darcy walked into the room and",
    "The weather at Longbourn that morning was",
    "Write a short letter to a friend about the ball.",
)


@dataclass
class DemoConfig(Config):
    """What the demo runs; the defaults take about 35 minutes on a 2-core CPU with the install
    (2026-12-02; most of it training, the wide-layer choice ~10 minutes of that)."""

    model: str = option("base model: a name, HF dir, .gguf or saved dir", "smollm2-135m")
    attention: str = option("the attention to linearize to", "augmented")
    plain: str = option("the plain linear attention it is compared with", "elu")
    budget: int = option("training tokens per linearized model (transfer + finetune)", 24_576)
    block_size: int = option("tokens per training sequence", 1024)
    batch_size: int = option("sequences per optimizer step", 1)
    medusa_tokens: int = option("tokens to train the Medusa heads on", 16_384)
    eval_tokens: int = option("evaluation tokens (first tokens of Pride and Prejudice)", 8_192)
    eval_window: int = option("perplexity window", 1024)
    position_data: str = option("long text streamed for perplexity by position", "prideprejudice")
    position_tokens: int = option(
        "its tokens streamed (long context; the demo stops there)", 12_288
    )
    position_buckets: list[int] = option(
        "position bucket edges", factory=lambda: [0, 1024, 4096, 8192, 12288]
    )
    contexts: list[int] = option("decode contexts to time", factory=lambda: [1024, 8192, 32768])
    decode_steps: int = option("decode steps timed at each context (the median is reported)", 32)
    # The decode timing only: perplexity and training stay in fp32 on torch. A finished demo
    # takes other values on a rerun (only the decode timing runs again). int4 on the fast
    # engine by default: how a user decodes (SmolLM2 on 2 AVX2 cores, 1k / 8k: augmented 33.7 /
    # 21.5 tok/s, fp32 on torch 4.3 / 3.7).
    quant: str = option(
        "weights of the decode timing: int4 or int8 (quantized copies of both models; with "
        "--engine auto they run on the onnx engine), bf16, or none (fp32)",
        "int4",
    )
    engine: str = option("engine of the decode timing: auto, torch or onnx", "auto")
    new_tokens: int = option("tokens generated per prompt for the speed comparison", 48)
    data: str = option("training data", "austen")
    eval_data: str = option("evaluation data", "austen:eval")
    device: str = option("auto, cpu, cuda", "auto")

    def validate(self) -> DemoConfig:
        for name in ("budget", "block_size", "medusa_tokens", "eval_tokens", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget < 3 * self.batch_size * self.block_size:
            raise ValueError(
                f"budget={self.budget} tokens is less than three optimizer steps of "
                f"{self.batch_size} x {self.block_size} tokens"
            )
        from linearize.engine import check_engine
        from linearize.models.quantize import check_quant

        check_quant(self.quant)
        check_engine(self.engine)
        if self.eval_tokens < self.eval_window:
            raise ValueError(f"eval_tokens={self.eval_tokens} < eval_window={self.eval_window}")
        return self


Progress = Callable[[str], None]


class Steps:
    """Results of finished steps, one JSON file each, written atomically."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.used: list[str] = []

    def get(self, name: str) -> Any | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, name: str, value: Any) -> Any:
        atomic_write(
            self.dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(value, indent=2))
        )
        return value

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.used.append(name)
        done = self.get(name)
        if done is not None:
            logger.info("step %s: done earlier, reusing its result", name)
            return done
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
        logger.info("step %s: %.1f s", name, seconds)
        self.put(name, value)
        self.put("seconds", {**(self.get("seconds") or {}), name: seconds})
        return value

    def seconds(self) -> float:
        """Time spent in the steps this invocation used, whichever invocation ran them (not
        the steps of options given up since, e.g. a decode timing with another ``--quant``)."""
        seconds = self.get("seconds") or {}
        return sum(seconds.get(name, 0.0) for name in dict.fromkeys(self.used))


def check_out(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse, before anything is written, an ``out`` that is a file or a non-empty folder
    holding no demo (a rerun continues a demo); ``overwrite`` empties it instead."""
    out = Path(out)
    foreign = out.is_file() or (
        out.is_dir() and not (out / "demo.json").exists() and any(out.iterdir())
    )
    if foreign and not overwrite:
        raise ValueError(
            f"--out {out} {'is a file' if out.is_file() else 'holds files but no demo'}; "
            "choose another --out or pass --overwrite to replace it"
        )
    if overwrite and (out.exists() or out.is_symlink()):
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()
        logger.info("removed %s (--overwrite)", out)
    return out


# Options that only choose how the decode timing runs: a finished demo reruns with others (its
# decode steps are named after them, so each is timed once).
DECODE_OPTIONS = ("quant", "engine", "decode_steps")


def check_config(out: Path, config: DemoConfig) -> None:
    """Refuse to continue a demo directory that was started with different options (except
    :data:`DECODE_OPTIONS`)."""
    path = out / "demo.json"
    current = asdict(config)
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = {
            k: (v, saved.get(k))
            for k, v in current.items()
            if k not in DECODE_OPTIONS and saved.get(k) != v
        }
        if diffs:
            listed = ", ".join(f"{k}={a!r} (saved: {b!r})" for k, (a, b) in diffs.items())
            raise ValueError(
                f"{out} holds a demo started with other options: {listed}; "
                "rerun with the same options or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2))


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# --- the steps ----------------------------------------------------------------------------


def _perplexity(model, config: DemoConfig) -> dict[str, Any]:
    from linearize.data import source_tokens
    from linearize.train.perplexity import PerplexityConfig, perplexity

    tokens = source_tokens(config.eval_data, model.tokenizer)
    options = PerplexityConfig(window=config.eval_window, tokens=config.eval_tokens, form="chunk")
    with torch.no_grad():
        return perplexity(model, tokens, options).to_dict()


def _perplexity_by_position(model, config: DemoConfig) -> dict[str, Any]:
    """The first ``position_tokens`` of the novel streamed through the model (a softmax model:
    windows of its max positions), perplexity per position bucket."""
    from linearize.data import source_tokens
    from linearize.eval.long_context import stream_perplexity

    tokens = source_tokens(config.position_data, model.tokenizer)[: config.position_tokens]
    return stream_perplexity(model, tokens, config.position_buckets).to_dict()


def _train(config: DemoConfig, out: Path, attention: str, progress: Callable | None):
    """Linearize the base model with ``attention`` and train it back; returns the model dir."""
    from linearize.train.config import TrainConfig
    from linearize.train.pipeline import run

    stage = "both" if _has_new_parameters(attention) else "finetune"
    train_config = TrainConfig(
        model=config.model,
        attention=attention,
        stage=stage,
        data=config.data,
        tokens=config.budget,
        block_size=config.block_size,
        batch_size=config.batch_size,
        lora=True,
        eval_tokens=2 * config.block_size,
        device=config.device,
        # Few, slow steps on a CPU: checkpoint often so an interrupted demo loses little.
        checkpoint_every=2,
    )
    resume = (out / "config.json").exists()
    result = run(train_config, out, resume=resume, callback=progress)
    return {
        "model_dir": str(result.model_dir),
        "stage": stage,
        "tokens": config.budget,
        "tokens_per_s": result.tokens_per_s,
    }


def _has_new_parameters(name: str) -> bool:
    """Whether stage 1 (attention transfer) has anything to train for this attention."""
    from linearize.layers.attention import build_attention, has_new_parameters

    return has_new_parameters(build_attention(name, hidden_size=64, num_heads=4, num_kv_heads=2))


def _train_medusa(config: DemoConfig, model_dir: str, progress: Callable | None) -> dict:
    import linearize
    from linearize.data import source_tokens
    from linearize.generation.medusa import save_with_heads
    from linearize.generation.medusa_train import MedusaTrainConfig, evaluate_heads, train_medusa

    model = linearize.load(model_dir)
    tokens = source_tokens(config.data, model.tokenizer)[: config.medusa_tokens + 1]
    held_out = source_tokens(config.eval_data, model.tokenizer)[-config.eval_window :]
    medusa_config = MedusaTrainConfig(
        tokens=config.medusa_tokens, data="model_labels", eval_tokens=config.eval_window
    )
    heads = train_medusa(model, tokens, medusa_config, held_out=held_out, progress=progress)
    save_with_heads(model, heads, model_dir)
    metrics = evaluate_heads(model, heads, held_out)
    return {k: v for k, v in metrics.items() if not k.startswith("rank_")}


def _decode_step(config: DemoConfig) -> str:
    """The step name of the decode timing, after the options it ran with."""
    return f"decode-{config.quant}-{config.engine}-{config.decode_steps}steps"


# Untimed steps before the timed ones: the first steps after a long prefill run slower (the
# process's memory settles; docs/results.md, "What the rest of the gap is made of").
DECODE_WARMUP = 16


def _decode_speed(sources: dict[str, str], config: DemoConfig) -> dict[str, list[dict[str, Any]]]:
    """Decode tokens/s of each model (label → where to load it) at each context, all timed
    together with their steps in turns (``config.quant``: on quantized copies), so that this
    machine's drifting speed favours no model and no context."""
    import linearize
    from linearize.bench.speed import supports_context, time_decodes
    from linearize.engine import resolve_engine
    from linearize.models.quantize import apply_quant

    runs, cells = [], []  # cells: (label, context, timed), in the report's order
    for label, source in sources.items():
        model = linearize.load(source).eval()
        if config.quant != "none":
            model = apply_quant(model, config.quant)
        engine = resolve_engine(config.engine, model)
        for context in config.contexts:
            timed = supports_context(model, context)
            cells.append((label, context, timed))
            if timed:
                runs.append((model, context, engine))
    timings = iter(time_decodes(runs, steps=config.decode_steps, warmup=DECODE_WARMUP))
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in sources}
    for label, context, timed in cells:
        row: dict[str, Any] = {"context": context, "supported": timed}
        if timed:
            timing = next(timings)
            ms = 1000 * sorted(timing["times"])[len(timing["times"]) // 2]
            row |= {
                "ms_per_token": ms,
                "tokens_per_s": 1000 / ms,
                "state_bytes": timing["state_bytes"],
                "engine": timing["engine"],
                "quant": timing["quant"],
            }
        rows[label].append(row)
    return rows


def _speculative(model_dir: str, config: DemoConfig) -> dict[str, Any]:
    """Greedy decoding of the fixed prompts: plain, Medusa with the hardware-aware tree choice,
    and Medusa with a fixed small tree; decode-loop tokens/s (the paper's protocol)."""
    import linearize
    from linearize.generation import GenerationConfig, generate, load_heads

    model = linearize.load(model_dir).eval()
    heads = load_heads(model_dir)
    modes = {
        "plain": {},
        "medusa": {"speculative": "medusa"},
        "medusa_tree8": {"speculative": "medusa", "tree": "tree-8"},
    }
    results: dict[str, list] = {name: [] for name in modes}
    calibration = None
    for prompt in PROMPTS:
        for name, options in modes.items():
            generation = GenerationConfig(max_new_tokens=config.new_tokens, **options)
            result = generate(model, prompt, generation, heads=heads, calibration=calibration)
            calibration = calibration or result.calibration
            results[name].append(result)
    summary: dict[str, Any] = {}
    for name, rows in results.items():
        decode_s = sum(r.seconds - r.prefill_s - r.calibration_s for r in rows)
        accepted = [r.mean_accepted for r in rows if r.mean_accepted]
        summary[name] = {
            "tokens_per_s": sum(len(r.token_ids) - 1 for r in rows) / decode_s,
            "forward_passes": sum(r.forward_passes for r in rows),
            "mean_accepted": sum(accepted) / len(accepted) if accepted else 1.0,
            "plan": rows[0].plan,
            # Whether any prompt's planner chose a tree (it may re-plan while decoding).
            "speculated": any(p["nodes"] > 1 for r in rows for p in r.plans),
            "identical": all(
                r.token_ids == p.token_ids for r, p in zip(rows, results["plain"], strict=True)
            ),
        }
    return summary


def _sample(model, prompt: str, new_tokens: int) -> str:
    from linearize.generation import GenerationConfig, generate

    return generate(model, prompt, GenerationConfig(max_new_tokens=new_tokens)).text


# --- the pipeline -------------------------------------------------------------------------


@dataclass
class DemoReport:
    config: dict[str, Any]
    ppl: dict[str, dict[str, Any]]
    by_position: dict[str, dict[str, Any]]
    training: dict[str, dict[str, Any]]
    decode: dict[str, list[dict[str, Any]]]
    medusa: dict[str, Any]
    speculative: dict[str, Any]
    samples: dict[str, str]
    model_dir: str
    seconds: float


def run_demo(
    config: DemoConfig,
    out: str | os.PathLike,
    *,
    train_progress: Callable[[str], Callable | None] = lambda name: None,
    announce: Callable[[str], None] = lambda text: None,
) -> DemoReport:
    """Run (or continue) the demo in ``out``; ``announce`` hears each step as it starts."""
    import linearize

    config.validate()
    out = Path(out)
    check_config(out, config)
    steps = Steps(out)
    # 1. the original: load it, score it
    announce(f"1/6 loading {config.model} and scoring the original")
    original = linearize.load(config.model).eval()
    ppl = {"original": steps.run("ppl_original", lambda: _perplexity(original, config))}
    by_position = {
        "original": steps.run(
            "position_original", lambda: _perplexity_by_position(original, config)
        )
    }
    samples = {"original": steps.run("sample_original", lambda: _sample(original, PROMPTS[0], 32))}
    original = None  # free its memory before training
    # 2.-3. linearize and train back: the paper's layer and a plain linear attention
    training, models = {}, {}
    for label, attention in (("augmented", config.attention), ("plain", config.plain)):
        announce(f"2/6 linearizing with {attention} and training it back ({config.budget} tokens)")
        training[label] = steps.run(
            f"train_{label}",
            lambda a=attention, n=label: _train(config, out / n, a, train_progress(n)),
        )
        models[label] = training[label]["model_dir"]
    # 4. evaluation of both
    announce("3/6 scoring the linearized models and timing decoding")
    for label, model_dir in models.items():
        model = linearize.load(model_dir).eval()
        ppl[label] = steps.run(f"ppl_{label}", lambda m=model: _perplexity(m, config))
        by_position[label] = steps.run(
            f"position_{label}", lambda m=model: _perplexity_by_position(m, config)
        )
        samples[label] = steps.run(f"sample_{label}", lambda m=model: _sample(m, PROMPTS[0], 32))
        model = None
    # The decode timing of the original and the augmented model, together (see _decode_speed).
    sources = {"original": config.model, "augmented": models["augmented"]}
    decode = steps.run(_decode_step(config), lambda: _decode_speed(sources, config))
    # 5. Medusa heads on the augmented model, then speculative decoding against plain decoding
    announce(f"4/6 training Medusa heads ({config.medusa_tokens} tokens)")
    medusa = steps.run(
        "medusa", lambda: _train_medusa(config, models["augmented"], train_progress("medusa"))
    )
    announce("5/6 decoding with and without Medusa")
    speculative = steps.run("speculative", lambda: _speculative(models["augmented"], config))
    announce("6/6 writing the report")
    report = DemoReport(
        config=asdict(config),
        ppl=ppl,
        by_position=by_position,
        training=training,
        decode=decode,
        medusa=medusa,
        speculative=speculative,
        samples=samples,
        model_dir=models["augmented"],
        seconds=steps.seconds(),
    )
    from linearize.demo.report import write_report

    write_report(report, out)
    return report
