"""``linearize bench decode|prefill|speculative|serve|report``: speed and memory, side by side.

Each benchmark prints a table (or, with ``--json``, one JSON object per line), and saves a record
(``<out>/<name>.json``), a markdown table and a PNG plot; ``bench report`` rebuilds
``docs/results.md`` from the records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from linearize.bench import llama_cpp, report, speed
from linearize.bench.memory import format_bytes, measure_bandwidth
from linearize.bench.serve import ServeBenchConfig, run_serve_benchmark
from linearize.bench.speculative import (
    DEFAULT_PROMPTS,
    heads_summary,
    load_target,
    run_speculative_benchmark,
    train_heads,
)
from linearize.cli import bench_forms, bench_forward, bench_train
from linearize.cli.options import (
    add_config_arguments,
    add_engine_argument,
    config_from_args,
    parsed_by,
)
from linearize.config import parse_options
from linearize.models.quantize import QUANTS, apply_quant


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="speed and memory benchmarks, results page")
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    decode = sub.add_parser("decode", help="per-token latency, state and peak RSS by context")
    _common(decode, speed.DEFAULT_DECODE_CONTEXTS)
    decode.add_argument("--steps", type=int, default=32, help="timed decode steps (median)")
    decode.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure every run this many times, in rounds, each round in fresh processes "
        "(unless --no-isolate); a row reports the median of all its steps and each round's "
        "median (round_ms: a process's speed on a shared VM varies from one to the next)",
    )
    decode.add_argument(
        "--warmup",
        type=int,
        default=speed.DEFAULT_DECODE_WARMUP,
        help="decode steps run before the timed ones (a step right after a long prefill runs "
        "slower for a few dozen steps: use ~128 to time the steady step)",
    )
    _weights_and_engine(decode)
    _llama_cpp_argument(decode)
    decode.set_defaults(func=run_decode, name="decode")

    prefill = sub.add_parser("prefill", help="prefill latency and peak memory by length")
    _common(prefill, speed.DEFAULT_PREFILL_CONTEXTS)
    _weights_and_engine(prefill)
    _llama_cpp_argument(prefill)
    prefill.set_defaults(func=run_prefill, name="prefill")

    spec = sub.add_parser("speculative", help="speculative decoding speed (Table 8 protocol)")
    spec.add_argument("--model", action="append", help="target model: name or path")
    spec.add_argument(
        "--attention", help="linearize the model (untrained) with this attention first"
    )
    spec.add_argument("--heads", help="folder of trained Medusa heads (default: the model's)")
    spec.add_argument(
        "--train-tokens",
        type=int,
        help="without heads: train them on this many Austen tokens (saved to --heads if given)",
    )
    spec.add_argument("--train-data", default="model_labels", help="corpus | model_labels")
    spec.add_argument("--lr", type=float, default=3e-3, help="learning rate of the heads")
    spec.add_argument(
        "--shared-proj",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="heads project with the model's frozen LM head (one vocab product per step)",
    )
    spec.add_argument("--prompts", type=int, help="how many of the built-in prompts (default all)")
    spec.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt")
    spec.add_argument(
        "--trees",
        default="tree-2,tree-4,tree-8,tree-16,auto",
        help="comma-separated Medusa trees (with heads)",
    )
    spec.add_argument(
        "--draft-layers", help="comma-separated truncated-draft depths (default: a quarter)"
    )
    spec.add_argument("--no-lookup", action="store_true", help="skip n-gram lookup drafting")
    spec.add_argument(
        "--quant", choices=list(QUANTS), help="quantize the target's weights as it loads"
    )
    add_engine_argument(spec, kv_type=False)  # (its engines: float32 rings, exact speculation)
    spec.add_argument(
        "--context",
        type=int,
        default=0,
        help="put the first N tokens of --context-data before every prompt (decoding at long "
        "context; default 0)",
    )
    spec.add_argument(
        "--context-data",
        default="prideprejudice",
        help="text the --context tokens come from (a built-in corpus or a file)",
    )
    spec.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    spec.add_argument("--no-chat", dest="chat", action="store_false", help="plain prompts")
    spec.add_argument("--threads", type=int, help="CPU threads for torch")
    spec.add_argument("--json", action="store_true", help="one JSON object per line")
    spec.add_argument(
        "--out", default="results", type=_results_folder, help="results folder (default: results/)"
    )
    spec.add_argument("--name", help="file name stem of the saved record (default: the kind)")
    spec.set_defaults(func=run_speculative, name="speculative")

    serve = sub.add_parser(
        "serve", help="the OpenAI-compatible server: streams, cached prefixes, idle sessions"
    )
    add_config_arguments(serve, ServeBenchConfig)
    serve.add_argument("--json", action="store_true", help="one JSON object per line")
    serve.add_argument(
        "--out", default="results", type=_results_folder, help="results folder (default: results/)"
    )
    serve.add_argument("--name", help="file name stem of the saved record (default: the kind)")
    serve.set_defaults(func=run_serve, name="serve")

    page = sub.add_parser("report", help="regenerate docs/results.md from the result records")
    page.add_argument("--results", default="results", help="folder of result records")
    page.add_argument("--page", default="docs/results.md", help="the page to write")
    page.set_defaults(func=run_report)

    for module in (bench_forms, bench_forward, bench_train):
        module.register(sub)


def _weights_and_engine(parser: argparse.ArgumentParser) -> None:
    """``--quant`` (repeatable) and ``--engine``: what each model is measured with."""
    parser.add_argument(
        "--quant",
        action="append",
        choices=list(QUANTS),
        help="weights to measure each model with (repeatable; default: as loaded)",
    )
    add_engine_argument(parser)


def _common(parser: argparse.ArgumentParser, contexts: tuple[int, ...]) -> None:
    parser.add_argument(
        "--model",
        action="append",
        help="model to measure: name, HF dir, .gguf or saved dir (repeatable; "
        "default smollm2-135m)",
    )
    parser.add_argument(
        "--attention",
        action="append",
        default=[],
        help="also measure each --model linearized (untrained) with this attention (repeatable)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attention option (repeatable): with --attention, of the linearized rows; without, "
        "set on each --model's linear layers, for options that keep its parameters "
        "(retain=0, use_global=false)",
    )
    parser.add_argument(
        "--contexts",
        type=parsed_by(speed.parse_contexts),
        default=contexts,
        help=f"comma-separated token counts, 8k allowed (default {','.join(map(str, contexts))})",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--out", default="results", type=_results_folder, help="results folder (default: results/)"
    )
    parser.add_argument("--name", help="file name stem of the saved record (default: the kind)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch and llama.cpp (default: torch's); a decode run prefills its "
        "prompt, which is not timed, on every core",
    )
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="measure in this process, not one process per run (faster; peak RSS is then this "
        "process's high-water mark). Decode runs take turns either way, so a machine whose "
        "speed drifts biases none: by context in their own processes, all at once here",
    )


def _specs(args: argparse.Namespace) -> list[speed.ModelSpec]:
    models = args.model or ["smollm2-135m"]
    quants = getattr(args, "quant", None) or [None]
    engine = getattr(args, "engine", "torch")
    kv_type = getattr(args, "kv_type", None)
    options = tuple(parse_options(args.option).items())
    if "name" in dict(options):
        raise ValueError("--option name=... is what --attention sets: pass --attention instead")
    # The options go with --attention where it is given (the models as loaded stay as they are).
    loaded = () if args.attention else options
    specs = [speed.ModelSpec(m, None, q, engine, loaded, kv_type) for m in models for q in quants]
    return specs + [
        speed.ModelSpec(m, a, q, engine, options, kv_type)
        for m in models
        for a in args.attention
        for q in quants
    ]


def _progress(message: str) -> None:
    print(f"… {message}", file=sys.stderr, flush=True)


def _command(args: argparse.Namespace, kind: str) -> str:
    """The command line that reproduces this run (from the parsed arguments)."""
    words = ["linearize", "bench", kind]
    for model in args.model or ["smollm2-135m"]:
        words += ["--model", model]
    attentions = getattr(args, "attention", None) or []
    for attention in [attentions] if isinstance(attentions, str) else attentions:
        words += ["--attention", attention]
    for option in getattr(args, "option", None) or []:
        words += ["--option", option]
    if hasattr(args, "contexts"):
        words += ["--contexts", ",".join(map(str, args.contexts))]
    if hasattr(args, "steps"):
        words += ["--steps", str(args.steps)]
    if hasattr(args, "warmup"):
        words += ["--warmup", str(args.warmup)]
    if getattr(args, "repeat", 1) != 1:
        words += ["--repeat", str(args.repeat)]
    for quant in getattr(args, "quant", None) or []:
        words += ["--quant", quant]
    if getattr(args, "engine", "auto") != "auto":
        words += ["--engine", args.engine]
    if getattr(args, "kv_type", None):
        words += ["--kv-type", args.kv_type]
    for flag in ("heads", "max_new_tokens", "trees", "draft_layers"):
        if getattr(args, flag, None) is not None:
            words += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for flag in ("no_lookup", "chat"):
        if getattr(args, flag, False):
            words.append("--" + flag.replace("_", "-"))
    if getattr(args, "threads", None):
        words += ["--threads", str(args.threads)]
    if getattr(args, "no_isolate", False):
        words.append("--no-isolate")
    if getattr(args, "llama_cpp", "auto") != "auto":
        words += ["--llama-cpp", args.llama_cpp]
    return shlex.join(words)


def _emit(
    args: argparse.Namespace,
    kind: str,
    rows: list[dict[str, Any]],
    extra: dict,
    command: str | None = None,
) -> None:
    command = command or _command(args, kind)
    path = report.save_results(args.out, args.name or kind, kind, rows, command, extra)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        stream = sys.stderr
    else:
        print(report.markdown_table(kind, rows))
        stream = sys.stdout
    for note in extra.get("notes", []):
        print(note, file=stream)
    print(f"saved {path} (+ .md, .png)", file=stream)


def _llama_cpp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--llama-cpp",
        choices=("auto", "on", "off"),
        default="auto",
        help="also run llama.cpp on the same GGUF (auto: when llama-cpp-python is installed)",
    )


def _gguf_for(source: str):
    from pathlib import Path

    from linearize.models.checkpoint import smollm2_gguf_path
    from linearize.models.io import BUILTIN_MODELS

    if source in BUILTIN_MODELS:
        return smollm2_gguf_path()
    return Path(source) if source.endswith(".gguf") else None


def _llama_cpp_ggufs(args: argparse.Namespace) -> list:
    """The GGUF files llama.cpp runs for ``args`` (checked before any measuring)."""
    if args.llama_cpp == "off" or (args.llama_cpp == "auto" and not llama_cpp.available()):
        return []
    if not llama_cpp.available():
        raise RuntimeError(
            "--llama-cpp on: llama-cpp-python is not installed "
            "(pip install 'linearize[llama-cpp]', which compiles llama.cpp: a few minutes)"
        )
    ggufs = {}
    for source in args.model or ["smollm2-135m"]:
        gguf = _gguf_for(source)
        if gguf is None:
            print(
                f"llama.cpp: {source} has no GGUF (only a built-in name or a .gguf path has one)",
                file=sys.stderr,
            )
        else:
            ggufs[str(gguf)] = gguf
    if not ggufs and args.llama_cpp == "on":
        raise ValueError(
            "--llama-cpp on: no --model has a GGUF for llama.cpp to run (a built-in name such as "
            "smollm2-135m, or a .gguf path); add --model smollm2-135m to compare with its GGUF"
        )
    return list(ggufs.values())


def _llama_cpp_peers(ggufs: list, models: dict[str, Any]) -> list[llama_cpp.LlamaCppPeer]:
    peers = []
    for gguf in ggufs:
        label = f"llama.cpp:{gguf.name}"
        peer = llama_cpp.LlamaCppPeer(gguf, label, torch.get_num_threads())
        models[label] = {
            "family": "llama.cpp",
            "attention": "softmax",
            "gguf": str(gguf),
            "weight_bytes": gguf.stat().st_size,
            "max_position_embeddings": peer.max_context,
        }
        peers.append(peer)
    return peers


def _results_folder(text: str) -> str:
    """``--out``: a folder (or a ``.json`` record path), checked before any measuring."""
    path = Path(text)
    if path.suffix != ".json" and path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; --out names a results folder")
    return text


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def run_decode(args: argparse.Namespace) -> int:
    _set_threads(args)
    ggufs = _llama_cpp_ggufs(args)  # a bad --llama-cpp fails before minutes of measuring
    models: dict[str, Any] = {}
    record = lambda spec, model: models.__setitem__(spec.label, speed.describe(model))
    rows = speed.bench_decode(
        _specs(args),
        args.contexts,
        steps=args.steps,
        warmup=args.warmup,
        isolate=not args.no_isolate,
        repeat=args.repeat,
        progress=_progress,
        on_model=record,
        peers=_llama_cpp_peers(ggufs, models),
    )
    bandwidth = measure_bandwidth()
    notes = [f"memory bandwidth (best tensor copy, read + write): {bandwidth / 1e9:.1f} GB/s"]
    notes += _bound_notes(rows, models, bandwidth)
    notes += [
        f"{row.model} @ {row.context}: not supported (past the model's trained context)"
        for row in rows
        if row.tokens_per_s is None
    ]
    extra = {"models": models, "bandwidth_bytes_per_s": bandwidth, "notes": notes}
    _emit(args, "decode", [r.to_dict() for r in rows], extra)
    return 0


def _bound_notes(
    rows: list[speed.DecodeRow], models: dict[str, Any], bandwidth: float
) -> list[str]:
    """Per model: the tokens/s that streaming what a step reads once per token would allow (the
    row's ``read_bytes``; rows without: the model's weights and the whole state)."""
    notes = []
    for label, info in models.items():
        bounds = []
        for r in rows:
            read = speed.step_read_bytes(r.read_bytes, info.get("weight_bytes"), r.state_bytes)
            if r.model == label and read is not None:
                bound = speed.physical_bound(read, bandwidth)
                bounds.append(f"{bound:.1f} @ {r.context} ({format_bytes(read)})")
        if bounds:
            notes.append(
                f"physical bound of {label} (the bytes a step reads, weights and state, once "
                f"per token at the bandwidth): {', '.join(bounds)} tokens/s"
            )
    return notes


def run_prefill(args: argparse.Namespace) -> int:
    _set_threads(args)
    ggufs = _llama_cpp_ggufs(args)  # a bad --llama-cpp fails before minutes of measuring
    models: dict[str, Any] = {}
    record = lambda spec, model: models.__setitem__(spec.label, speed.describe(model))
    rows = speed.bench_prefill(
        _specs(args),
        args.contexts,
        isolate=not args.no_isolate,
        progress=_progress,
        on_model=record,
        peers=_llama_cpp_peers(ggufs, models),
    )
    notes = [
        f"{r.model} @ {r.context}: past its max_position_embeddings "
        f"({models[r.model]['max_position_embeddings']}): timed only, the compute is the same"
        for r in rows
        if models[r.model]["family"] != "linear"
        and r.context > models[r.model]["max_position_embeddings"]
    ]
    _emit(args, "prefill", [r.to_dict() for r in rows], {"models": models, "notes": notes})
    return 0


def run_speculative(args: argparse.Namespace) -> int:
    _set_threads(args)
    models = args.model or ["smollm2-135m"]
    if len(models) > 1:
        raise ValueError("bench speculative measures one target model: pass --model once")
    if args.out.endswith(".json"):  # a record path: its folder and stem
        args.out, args.name = str(Path(args.out).parent), Path(args.out).stem
    draft = None if args.draft_layers is None else _int_list(args.draft_layers, "--draft-layers")
    target = apply_quant(load_target(models[0], args.attention), args.quant, models[0])
    heads, origin = _medusa_heads(args, target, models[0])
    prompts = list(DEFAULT_PROMPTS[: args.prompts])
    context = _context_text(target, args.context, args.context_data)
    rows = run_speculative_benchmark(
        target,
        prompts,
        max_new_tokens=args.max_new_tokens,
        trees=[t for t in args.trees.split(",") if t],
        draft_layers=draft,
        lookup=not args.no_lookup,
        heads=heads,
        chat=args.chat,
        engine=args.engine,
        context=context,
        threads=args.threads,
        progress=_progress,
    )
    label = models[0] if args.attention in (None, "none") else f"{models[0]}+{args.attention}"
    if args.quant not in (None, "none"):
        label += f"+{args.quant}"
    quant = target.quantization.quant if target.quantization is not None else "none"
    rows = [{"model": label, **row, "quant": quant, "context": args.context} for row in rows]
    # Speculation is exact against plain decoding with the same arithmetic (each row is checked
    # against the plain row of the arithmetic it ran).
    same = all(r["identical"] for r in rows)
    notes = [] if heads is None else heads_summary(heads)
    context_note = f", after {args.context} tokens of {args.context_data}" if args.context else ""
    notes.append(
        f"{len(prompts)} prompts{context_note}, up to {args.max_new_tokens} new tokens (EOS "
        f"stops), greedy, batch 1, chat template {'on' if args.chat else 'off'}, "
        f"{torch.get_num_threads()} threads, engine {rows[0]['engine']}. Output equality with "
        "plain decoding at the same arithmetic: "
        f"{'every method identical' if same else 'SOME METHODS DIFFER (see identical column)'}."
    )
    if any(r["arithmetic"] != rows[0]["arithmetic"] for r in rows):
        notes.append(
            "The engine's plain decoding with int8 arithmetic (its default without speculation) "
            "is what speculation must beat; a method the planner leaves off decodes with it. Its "
            "tokens may differ from fp32 arithmetic in near-ties."
        )
    setup = {
        "model": models[0],
        "attention": args.attention,
        "heads": origin,
        "heads_metrics": None if heads is None else heads.metrics,
        "rank_accuracy": None if heads is None else heads.rank_accuracy,
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "chat": args.chat,
        "threads": torch.get_num_threads(),
        "engine": rows[0]["engine"],
        "context": args.context,
        "context_data": args.context_data if args.context else None,
    }
    _emit(args, "speculative", rows, {"models": {}, "setup": setup, "notes": notes})
    return 0


def _context_text(model, tokens: int, data: str) -> str:
    """The first ``tokens`` tokens of ``data`` as text ('' for 0)."""
    if tokens < 0:
        raise ValueError(f"--context must be >= 0 tokens, got {tokens}")
    if tokens == 0:
        return ""
    from linearize.data import source_tokens

    if model.tokenizer is None:
        raise ValueError("--context needs a model with a tokenizer (its text goes before prompts)")
    ids = source_tokens(data, model.tokenizer)
    if len(ids) < tokens:
        raise ValueError(f"--context {tokens}: {data!r} has only {len(ids)} tokens")
    return model.tokenizer.decode(ids[:tokens].tolist())


def _medusa_heads(args: argparse.Namespace, model, source: str) -> tuple[Any, str]:
    """The heads to benchmark and where they come from: --heads, the model's folder, or trained
    (--train-tokens; saved to --heads); ``(None, "none")`` without any."""
    from linearize.generation.medusa import load_heads
    from linearize.generation.medusa_train import MedusaTrainConfig

    heads = load_heads(args.heads) if args.heads else None
    if heads is None and Path(source).is_dir():
        heads = load_heads(source)
    if heads is not None:
        return heads, "loaded"
    if args.train_tokens is None:
        if args.heads:
            raise ValueError(f"--heads {args.heads}: no Medusa heads there (--train-tokens N)")
        return None, "none"
    config = MedusaTrainConfig(
        tokens=args.train_tokens, data=args.train_data, lr=args.lr, shared_proj=args.shared_proj
    )
    report = lambda step, total, metrics: _progress(
        f"medusa heads step {step}/{total}, loss " + " ".join(f"{x:.2f}" for x in metrics["loss"])
    )
    return train_heads(model, config, save_to=args.heads, progress=report), "trained"


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args, ServeBenchConfig)
    # One line per HTTP request would drown the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    words = ["linearize", "bench", "serve"]
    defaults = ServeBenchConfig()
    for field in dataclasses.fields(ServeBenchConfig):
        value = getattr(config, field.name)
        if value != getattr(defaults, field.name):
            for item in value if isinstance(value, list) else [value]:
                words += ["--" + field.name.replace("_", "-"), str(item)]
    rows = run_serve_benchmark(config, progress=_progress)
    _emit(args, "serve", rows, {"models": {}}, command=shlex.join(words))
    return 0


def run_report(args: argparse.Namespace) -> int:
    page = report.render_page(args.results, args.page)
    print(f"wrote {page}")
    return 0
