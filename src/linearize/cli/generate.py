"""``linearize generate`` and ``linearize train-medusa``.

Examples::

    linearize generate --model smollm2-135m --prompt "Once upon a time" --max-new-tokens 64
    linearize generate --model runs/medusa --prompt "Hello" --chat --speculative medusa --json
    linearize generate --model smollm2-135m --prompt "..." --speculative draft --draft-layers 8
    linearize generate --model runs/aug-q4 --prompt-file novel.txt --max-new-tokens 64
    linearize train-medusa --model runs/augmented --out runs/medusa --tokens 50000

Text streams to stdout as it is produced (a summary goes to stderr); ``--json`` prints exactly one
JSON object instead: token_ids, text, tokens_per_s, forward_passes (target passes after the
prefill), mean_accepted (tokens per such pass), and the speculation plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linearize.cli.options import (
    add_attention_arguments,
    add_config_arguments,
    add_engine_argument,
    add_quant_argument,
    apply_attention_args,
    config_from_args,
)
from linearize.data import split_tokens
from linearize.data.corpora import read_utf8
from linearize.generation.acceptance import list_acceptance_rules
from linearize.generation.calibrations import CalibrationStore
from linearize.generation.config import GenerationConfig
from linearize.generation.medusa import save_with_heads
from linearize.generation.medusa_train import MedusaTrainConfig
from linearize.models.directory import check_output


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate text (plain, Medusa, draft-model or prompt-lookup speculative decoding)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--model", required=True, help="model name or path")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument(
        "--prompt-file",
        help="read the prompt from this UTF-8 text file ('-': standard input): prompts longer "
        "than a command line takes (one argument holds at most 128 KiB, ~30k tokens)",
    )
    gen.add_argument("--draft", help="draft model name or path (--speculative draft)")
    gen.add_argument("--heads", help="Medusa heads directory (default: the model directory)")
    gen.add_argument("--json", action="store_true", help="print one JSON object, no stream")
    gen.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's; 1 on a busy CPU)"
    )
    gen.add_argument(
        "--recalibrate",
        action="store_true",
        help="with --speculative on the onnx engine: time plain steps against tree passes "
        "again instead of using this machine's stored timings (e.g. after its load changed)",
    )
    add_config_arguments(gen, GenerationConfig, choices={"acceptance": list_acceptance_rules()})
    add_attention_arguments(gen, required=False)
    add_quant_argument(gen)
    add_engine_argument(gen)
    gen.set_defaults(func=run)

    train = subparsers.add_parser(
        "train-medusa",
        help="train Medusa heads on a frozen model and save the model with them",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--model", required=True, help="model name or path")
    train.add_argument("--out", required=True, help="directory for the model and its heads")
    train.add_argument("--corpus", default="austen", help="corpus name or text path (austen)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not our model"
    )
    add_config_arguments(train, MedusaTrainConfig)
    add_attention_arguments(train, required=False)
    train.set_defaults(func=run_train)


def _load(args: argparse.Namespace):
    import linearize

    model = linearize.load(args.model)
    apply_attention_args(model, args)
    from linearize.models.quantize import apply_quant

    apply_quant(model, getattr(args, "quant", None), args.model)
    return model.eval()


def _config(args: argparse.Namespace) -> GenerationConfig:
    return config_from_args(args, GenerationConfig)


def _heads(args: argparse.Namespace, model):
    from linearize.generation.medusa import load_heads

    if args.speculative != "medusa":
        return None
    source = args.heads or args.model
    heads = load_heads(source) if Path(source).is_dir() else None
    if heads is None:
        raise ValueError(
            f"--speculative medusa: no Medusa heads in {source!r} (medusa.safetensors + "
            "medusa.json); train them with `linearize train-medusa`"
        )
    return heads


def run(args: argparse.Namespace) -> int:
    import torch

    import linearize
    from linearize.generation.decode import generate

    config = _config(args)
    if args.prompt_file is not None:
        args.prompt = _read_prompt(args.prompt_file)
    if not args.prompt:
        raise ValueError("the prompt is empty: give some text with --prompt or --prompt-file")
    if args.draft is not None and args.speculative != "draft":
        raise ValueError("--draft is only used with --speculative draft")
    if args.recalibrate and args.speculative == "none":
        raise ValueError("--recalibrate times speculation: use it with --speculative")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model = _load(args)
    heads = _heads(args, model)
    draft = linearize.load(args.draft).eval() if args.draft is not None else None
    engine = _engine(args, model, config)

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = generate(
        model,
        args.prompt,
        config,
        heads=heads,
        draft=draft,
        on_text=None if args.json else show,
        engine=engine,
        calibrations=CalibrationStore(refresh=args.recalibrate),
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(flush=True)
    summary = (
        f"{len(result.token_ids)} tokens, {result.tokens_per_s:.2f} tokens/s, "
        f"{result.forward_passes} forward passes, {result.mean_accepted:.2f} tokens/pass "
        f"({result.finish_reason})"
    )
    if result.plan is not None:
        plan = result.plan
        summary += f"; {plan['mode']}: {plan['nodes']} nodes/γ={plan['gamma']} ({plan['reason']})"
    print(summary, file=sys.stderr)
    return 0


def _read_prompt(path: str) -> str:
    """The text of ``--prompt-file`` (``-``: standard input)."""
    if path == "-":
        return sys.stdin.read()
    try:
        return read_utf8(Path(path))
    except FileNotFoundError:
        raise ValueError(f"--prompt-file {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--prompt-file {path} is a folder; give a text file") from None


def _engine(args: argparse.Namespace, model, config: GenerationConfig):
    """The fast engine ``--engine`` asks for (``None``: the PyTorch reference)."""
    from linearize.engine import build_engine, resolve_engine
    from linearize.generation.streaming import encode_prompt

    name = resolve_engine(args.engine, model)
    if name == "torch":
        return None
    prompt = encode_prompt(model.tokenizer, args.prompt, chat=config.chat)
    context = len(prompt) + config.max_new_tokens
    # Speculation keeps its guarantee (greedy output = plain greedy output) only when tree passes
    # and steps compute alike: fp32 arithmetic; plain decoding takes the faster int8 one.
    accuracy = "int8" if config.speculative == "none" else "fp32"
    return build_engine(
        name,
        model,
        max_context=context,
        threads=args.threads,
        accuracy=accuracy,
        kv_type=args.kv_type,
    )


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from linearize.generation.medusa_train import train_medusa

    config = config_from_args(args, MedusaTrainConfig)
    out = check_output(args.out, overwrite=args.overwrite, source=args.model)
    model = _load(args)
    train, held_out = split_tokens(args.corpus, model.tokenizer, args.eval_tokens)
    with tqdm(desc="medusa", unit="step", file=sys.stderr) as bar:

        def progress(step: int, total: int, metrics: dict) -> None:
            bar.total = total
            bar.set_postfix(loss=" ".join(f"{x:.3g}" for x in metrics["loss"]), refresh=False)
            bar.update(step - bar.n)

        heads = train_medusa(model, train, config, held_out=held_out, progress=progress)
    save_with_heads(model, heads, out, overwrite=args.overwrite)
    ev = heads.metrics["eval"]
    print("head  top1(text)  top5(text)  top1(model)  top5(model)")
    for m in range(len(heads)):
        print(
            f"{m:4d}  {ev['top1'][m]:10.3f}  {ev['top5'][m]:10.3f}  "
            f"{ev['top1_agreement'][m]:11.3f}  {ev['top5_agreement'][m]:11.3f}"
        )
    print(f"saved the model and {len(heads)} Medusa heads to {out}")
    return 0
