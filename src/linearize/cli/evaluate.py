"""``linearize eval ppl`` and ``linearize study``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tqdm import tqdm

from linearize.bench import report
from linearize.cli import harness
from linearize.cli.options import (
    add_attention_arguments,
    add_config_arguments,
    add_engine_argument,
    add_quant_argument,
    apply_attention_args,
    config_from_args,
    model_label,
)
from linearize.data import source_tokens
from linearize.eval import long_context
from linearize.eval.engine_perplexity import engine_perplexity, engine_stream_perplexity
from linearize.eval.study import StudyConfig, run_study, study_variants, write_outputs
from linearize.train.perplexity import PerplexityConfig, perplexity, scored_tokens


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model: perplexity (windows or by position), harness tasks, passkey"
    )
    sub = parser.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    ppl = sub.add_parser(
        "ppl", help="perplexity on a corpus (no BOS): in windows, or by position with --stream"
    )
    ppl.add_argument("--model", default="smollm2-135m", help="name, HF dir, .gguf or saved dir")
    # --attention (+ --group-size, --conv-size, --option): linearize, untrained, before scoring
    add_attention_arguments(ppl, required=False)
    add_quant_argument(ppl)
    add_engine_argument(ppl)
    ppl.add_argument(
        "--data",
        default="austen:eval",
        help="austen:eval (first 50,176 tokens of Pride and Prejudice), mobydick, another "
        "built-in corpus, or a .txt/.md/.jsonl file or folder",
    )
    add_config_arguments(ppl, PerplexityConfig)
    ppl.add_argument(
        "--buckets",
        help="increasing position edges of the buckets, e.g. 0,1024,4096 (the last runs to the "
        "end): with --stream positions in the text (default: "
        f"{','.join(map(str, long_context.DEFAULT_BUCKETS))}); without, positions inside each "
        "window, pooled over the windows (edges below --window, e.g. 0,256,516)",
    )
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.add_argument("--out", help="also save a result record in this folder (for bench report)")
    ppl.set_defaults(func=run_ppl)
    harness.register(sub)

    key = sub.add_parser("passkey", help="passkey retrieval: a number hidden in filler text")
    key.add_argument("--model", default="smollm2-135m", help="name, HF dir, .gguf or saved dir")
    add_attention_arguments(key, required=False)
    add_quant_argument(key)
    key.add_argument(
        "--lengths",
        default=",".join(map(str, long_context.PASSKEY_LENGTHS)),
        help="prompt lengths in tokens, comma-separated",
    )
    key.add_argument("--trials", type=int, default=5, help="depths per length, spread over [0,1]")
    key.add_argument(
        "--depths", help="explicit comma-separated depths in [0, 1] (replaces --trials)"
    )
    key.add_argument("--seed", type=int, default=0, help="seed of the hidden numbers")
    key.add_argument("--json", action="store_true", help="print one JSON object")
    key.add_argument("--out", help="also save a result record in this folder (for bench report)")
    key.set_defaults(func=run_passkey)

    study = subparsers.add_parser(
        "study", help="the paper's study: every causal linear attention, same training budget"
    )
    add_config_arguments(study, StudyConfig, skip=("variants",))
    study.add_argument(
        "--variants", help=f"comma-separated subset of: {', '.join(study_variants())}"
    )
    study.add_argument("--json", action="store_true", help="one JSON object per variant")
    study.set_defaults(func=run_study_command)


def run_ppl(args: argparse.Namespace) -> int:
    from linearize.models import load

    config = config_from_args(args, PerplexityConfig)
    model = load(args.model)
    apply_attention_args(model, args)
    from linearize.models.quantize import apply_quant

    apply_quant(model, args.quant, args.model)
    tokens = source_tokens(args.data, model.tokenizer)
    in_window = None
    if args.buckets is not None and not args.stream:
        edges = long_context.parse_ints(args.buckets, "--buckets")
        in_window = long_context.InWindowBuckets(edges, config.window)
    if args.stream:
        edges = long_context.check_buckets(
            long_context.DEFAULT_BUCKETS
            if args.buckets is None
            else long_context.parse_ints(args.buckets, "--buckets")
        )
        tokens = scored_tokens(tokens, config)
    # A stream's softmax layers read windows of the model's positions (long_context); a linear
    # layer's state does not depend on the engine's context.
    context = min(len(tokens), model.config.max_position_embeddings) if args.stream else args.window
    engine = _ppl_engine(args, model, context)
    with tqdm(desc="perplexity", unit="window", file=sys.stderr, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        if args.stream:
            bar.unit = "token"
            return _report_stream(args, model, engine, tokens, edges, progress)
        if engine is not None:
            result = engine_perplexity(engine, tokens, config, progress, in_window)
        else:
            result = perplexity(model, tokens, config, progress, in_window)
    row = result.to_dict()
    buckets = [] if in_window is None else in_window.buckets()
    if in_window is not None:
        row["buckets"] = [b.to_dict() for b in buckets]
        row["bucket_positions"] = "in window"
    if args.out:
        command = _command(args)
        record = {"model": model_label(args), "data": args.data, **row}
        report.save_results(args.out, _stem(args), "ppl", [record], command, _models(args, model))
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"perplexity {result.ppl:.3f} (NLL {result.nll:.4f} nats/token) on {args.data}: "
            f"{result.tokens:,} tokens scored, window {result.window}, form {result.form}, "
            f"{result.seconds:.1f} s"
        )
        if buckets:
            print("by position inside the window, pooled over the windows:")
        for b in buckets:
            print(f"  {b.start:>7,}–{b.end:<7,} {b.tokens:>8,} tokens  ppl {b.ppl:10.3f}")
    return 0


def _ppl_engine(args: argparse.Namespace, model, context: int):
    """The engine ``--engine`` asks for (``None``: the PyTorch reference)."""
    from linearize.engine import build_engine, resolve_engine

    name = resolve_engine(args.engine, model)
    if name == "torch":
        return None
    return build_engine(name, model, max_context=context, kv_type=args.kv_type)


def _report_stream(args, model, engine, tokens, edges, progress) -> int:
    start = time.perf_counter()
    if engine is None:
        result = long_context.stream_perplexity(
            model, tokens, edges, args.window, args.form, progress
        )
        row = {**result.to_dict(), "window": args.window, "form": args.form}
    else:  # the engine reads the text in chains of its tree size
        result = engine_stream_perplexity(engine, tokens, edges, progress)
        row = {**result.to_dict(), "window": result.segment, "form": "engine"}
    row["seconds"] = time.perf_counter() - start
    if args.out:
        record = {"model": model_label(args), "data": args.data, **row}
        stem, command = _stem(args), _command(args)
        report.save_results(args.out, stem, "ppl_position", [record], command, _models(args, model))
    if args.json:
        print(json.dumps(row))
        return 0
    print(
        f"perplexity {result.ppl:.3f} on {args.data}: {result.tokens:,} tokens scored "
        f"({result.scored_as}), {row['seconds']:.1f} s"
    )
    for b in result.buckets:
        print(f"  {b.start:>7,}–{b.end:<7,} {b.tokens:>8,} tokens  ppl {b.ppl:10.3f}")
    return 0


def run_passkey(args: argparse.Namespace) -> int:
    from linearize.models import load

    lengths = long_context.parse_ints(args.lengths, "--lengths")
    if args.depths:
        depths = [float(d) for d in args.depths.split(",") if d.strip()]
    else:
        depths = long_context.passkey_depths(args.trials)
    for d in depths:
        if not 0 <= d <= 1:
            raise ValueError(f"--depths: every depth must be in [0, 1], got {d}")
    model = load(args.model)
    apply_attention_args(model, args)
    from linearize.models.quantize import apply_quant

    apply_quant(model, args.quant, args.model)

    def on_trial(t: long_context.PasskeyTrial) -> None:
        mark = "found" if t.found else "missed"
        print(f"… {t.length} tokens, depth {t.depth:.2f}: {mark} ({t.answer!r})", file=sys.stderr)

    accuracy, trials, skipped = long_context.passkey(model, lengths, depths, args.seed, on_trial)
    for n in skipped:
        print(
            f"length {n} skipped: past this softmax model's "
            f"{model.config.max_position_embeddings} positions",
            file=sys.stderr,
        )
    row = {
        "model": model_label(args),
        "accuracy": {str(n): a for n, a in accuracy.items()},
        "trials": len(depths),
        "skipped": skipped,
    }
    if args.out:
        command = f"linearize eval passkey --model {args.model} --lengths {args.lengths}"
        command += f" --quant {args.quant}" if args.quant else ""
        command += f" --depths {args.depths}" if args.depths else f" --trials {args.trials}"
        command += f" --seed {args.seed}" if args.seed else ""
        stem = f"passkey-{_stem_label(args)}"
        report.save_results(args.out, stem, "passkey", [row], command, _models(args, model))
    if args.json:
        print(json.dumps(row))
    else:
        for n, a in accuracy.items():
            print(f"passkey {n:>6} tokens: {a:.0%} of {len(depths)}")
    return 0


def _models(args: argparse.Namespace, model) -> dict:
    """A record's ``extra``: what it measured, by its label (family, weights; as ``bench``'s)."""
    from linearize.bench.speed import describe

    return {"models": {model_label(args): describe(model)}}


def _stem_label(args: argparse.Namespace) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_label(args)).strip("_")


def _stem(args: argparse.Namespace) -> str:
    parts = [model_label(args), args.data, f"w{args.window}", args.form]
    parts += [f"t{args.tokens}"] if args.tokens else []
    parts += [f"s{args.stride}"] if args.stride else []
    parts += ["stream"] if args.stream else []
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(parts))
    return f"ppl-{safe.strip('_')}"


def _command(args: argparse.Namespace) -> str:
    words = [
        f"linearize eval ppl --model {args.model}",
        f" --attention {args.attention}" if args.attention else "",
        f" --quant {args.quant}" if getattr(args, "quant", None) else "",
        f" --engine {args.engine}" if getattr(args, "engine", "auto") != "auto" else "",
        f" --kv-type {args.kv_type}" if getattr(args, "kv_type", None) else "",
        "".join(f" --option {pair}" for pair in args.option),
        f" --group-size {args.group_size}" if args.attention and args.group_size else "",
        f" --conv-size {args.conv_size}" if args.attention and args.conv_size else "",
        f" --data {args.data} --window {args.window}",
        f" --stride {args.stride}" if args.stride else "",
        f" --tokens {args.tokens}" if args.tokens else "",
        f" --form {args.form}",
        " --stream" if args.stream else "",
        f" --buckets {args.buckets}" if args.buckets else "",
    ]
    return "".join(words)


def run_study_command(args: argparse.Namespace) -> int:
    variants = args.variants.split(",") if args.variants else None
    config = config_from_args(args, StudyConfig, variants=variants)

    def callback(event: dict) -> None:
        if event.get("event") == "variant":
            print(f"… variant {event['variant']}", file=sys.stderr, flush=True)

    rows = run_study(config, callback)
    command = (
        f"linearize study --model {config.model} --data {config.data} --tokens {config.tokens} "
        f"--eval-tokens {config.eval_tokens} --window {config.window}"
        + (f" --eval-data {config.eval_data}" if config.eval_data else "")
        + (f" --variants {args.variants}" if args.variants else "")
    )
    path = write_outputs(config, rows, command)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(report.markdown_table("study", rows))
        print(f"saved {path} (+ study.md, study.csv, study.png)")
    return 0
