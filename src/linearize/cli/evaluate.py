"""``linearize eval ppl`` and ``linearize study``."""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from linearize.bench import report
from linearize.cli.options import (
    add_attention_arguments,
    add_config_arguments,
    attention_from_args,
    config_from_args,
)
from linearize.data import source_tokens
from linearize.eval.study import StudyConfig, run_study, study_variants, write_outputs
from linearize.train.perplexity import PerplexityConfig, perplexity


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (perplexity)")
    sub = parser.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    ppl = sub.add_parser("ppl", help="perplexity on a corpus (no BOS, non-overlapping windows)")
    ppl.add_argument("--model", default="smollm2-135m", help="name, HF dir, .gguf or saved dir")
    # --attention (+ --group-size, --conv-size, --option): linearize, untrained, before scoring
    add_attention_arguments(ppl, required=False)
    ppl.add_argument(
        "--data",
        default="austen:eval",
        help="austen:eval (first 50,176 tokens of Pride and Prejudice), mobydick, another "
        "built-in corpus, or a .txt/.md/.jsonl file or folder",
    )
    add_config_arguments(ppl, PerplexityConfig)
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.add_argument("--out", help="also save a result record in this folder (for bench report)")
    ppl.set_defaults(func=run_ppl)

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
    if args.attention:
        from linearize.models import linearize

        linearize(model, attention_from_args(args))
    tokens = source_tokens(args.data, model.tokenizer)
    with tqdm(desc="perplexity", unit="window", file=sys.stderr, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = perplexity(model, tokens, config, progress)
    row = result.to_dict()
    if args.out:
        command = _command(args)
        record = {"model": _label(args), "data": args.data, **row}
        report.save_results(args.out, _stem(args), "ppl", [record], command)
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"perplexity {result.ppl:.3f} (NLL {result.nll:.4f} nats/token) on {args.data}: "
            f"{result.tokens:,} tokens scored, window {result.window}, form {result.form}, "
            f"{result.seconds:.1f} s"
        )
    return 0


def _label(args: argparse.Namespace) -> str:
    """``model``, ``model+attention`` or ``model+attention(size=128,sinks=0)``."""
    if not args.attention:
        return args.model
    options = {k: v for k, v in attention_from_args(args).items() if k != "name"}
    listed = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{args.model}+{args.attention}" + (f"({listed})" if listed else "")


def _stem(args: argparse.Namespace) -> str:
    parts = [_label(args), args.data, f"w{args.window}", args.form]
    parts += [f"t{args.tokens}"] if args.tokens else []
    parts += [f"s{args.stride}"] if args.stride else []
    parts += ["stream"] if args.stream else []
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(parts))
    return f"ppl-{safe.strip('_')}"


def _command(args: argparse.Namespace) -> str:
    words = [
        f"linearize eval ppl --model {args.model}",
        f" --attention {args.attention}" if args.attention else "",
        "".join(f" --option {pair}" for pair in args.option) if args.attention else "",
        f" --group-size {args.group_size}" if args.attention and args.group_size else "",
        f" --conv-size {args.conv_size}" if args.attention and args.conv_size else "",
        f" --data {args.data} --window {args.window}",
        f" --stride {args.stride}" if args.stride else "",
        f" --tokens {args.tokens}" if args.tokens else "",
        f" --form {args.form}",
        " --stream" if args.stream else "",
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
