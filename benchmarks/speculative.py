"""Speculative decoding on the embedded model: plain vs Medusa (several trees) vs drafts.

The paper's Table 8 protocol on this machine: fixed prompts, greedy, batch 1; tokens/s and mean
accepted tokens per target pass for plain decoding, Medusa trees of several sizes (and the
hardware-aware choice), prompt lookup and a layer-truncated draft. Every speculative output is
checked token for token against plain decoding ("identical").

By default the model is SmolLM2-135M linearized with "augmented" and *not* fine-tuned (its text
is poor; speed and acceptance are still measurable), with Medusa heads trained briefly on Austen
(``--train-tokens``), labels = the model's own argmax on the text. ``--model DIR`` takes a saved
model (with its heads if the directory has them); ``--heads DIR`` caches trained heads.

    python benchmarks/speculative.py --train-tokens 30000 --heads runs/bench-heads \\
        --out results/speculative.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import linearize
from linearize.bench.speculative import (
    DEFAULT_PROMPTS,
    markdown_table,
    run_speculative_benchmark,
)
from linearize.data import eval_tokens, source_tokens
from linearize.generation import MedusaTrainConfig, load_heads, save_heads, train_medusa


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="name or saved directory")
    p.add_argument("--attention", default="augmented", help="linearize a built-in model with it")
    p.add_argument("--heads", help="heads directory: loaded if present, else trained and saved")
    p.add_argument("--train-tokens", type=int, default=30_000)
    p.add_argument("--train-data", default="model_labels", help="corpus | model_labels")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--shared-proj",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="heads project with the model's frozen LM head (one vocab product per step)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=len(DEFAULT_PROMPTS), help="how many prompts")
    p.add_argument("--trees", nargs="+", default=["tree-2", "tree-4", "tree-8", "tree-16", "auto"])
    p.add_argument("--draft-layers", type=int, nargs="*", default=[8])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=True, help="chat template"
    )
    p.add_argument("--out", help="write the rows and the setup as JSON here")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    model = linearize.load(args.model)
    if not Path(args.model).is_dir() and args.attention:
        linearize.linearize(model, args.attention)
    return model.eval()


def get_heads(args: argparse.Namespace, model):
    heads = getattr(model, "medusa", None)
    if heads is None and Path(args.model).is_dir():
        heads = load_heads(args.model)
    if heads is None and args.heads:
        heads = load_heads(args.heads)
    if heads is not None:
        return heads, "loaded"
    config = MedusaTrainConfig(
        tokens=args.train_tokens, data=args.train_data, lr=args.lr, shared_proj=args.shared_proj
    )
    with tqdm(desc="medusa heads", unit="step", file=sys.stderr) as bar:

        def progress(step, total, metrics):
            bar.total = total
            bar.set_postfix(loss=" ".join(f"{x:.2f}" for x in metrics["loss"]), refresh=False)
            bar.update(step - bar.n)

        start = time.perf_counter()
        heads = train_medusa(
            model,
            source_tokens("austen", model.tokenizer),
            config,
            held_out=eval_tokens(model.tokenizer, 4096),
            progress=progress,
        )
    heads.metrics["train"]["seconds"] = time.perf_counter() - start
    if args.heads:
        save_heads(heads, args.heads)
    return heads, "trained"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = build_model(args)
    with torch.enable_grad():
        heads, origin = get_heads(args, model)
    ev = heads.metrics.get("eval", {})
    if ev:
        print("Medusa heads (held-out P&P): top-1/top-5 vs text, top-1 agreement with the model")
        for m in range(len(heads)):
            print(
                f"  head {m}: {ev['top1'][m]:.3f} / {ev['top5'][m]:.3f}, "
                f"agreement {ev['top1_agreement'][m]:.3f}"
            )
    prompts = list(DEFAULT_PROMPTS[: args.prompts])
    with tqdm(desc="prompts", total=len(prompts), file=sys.stderr) as bar:
        rows = run_speculative_benchmark(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            trees=args.trees,
            draft_layers=args.draft_layers,
            heads=heads,
            chat=args.chat,
            progress=lambda name: (bar.set_postfix_str(name), bar.update(1)),
        )
    print(markdown_table(rows))
    same = all(r["identical"] for r in rows)
    print(
        f"\n{len(prompts)} prompts, up to {args.max_new_tokens} new tokens (EOS stops), greedy, "
        f"batch 1, chat template {'on' if args.chat else 'off'}, "
        f"{torch.get_num_threads()} threads. Output equality with plain decoding: "
        f"{'every method identical' if same else 'SOME METHODS DIFFER (see identical column)'}."
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        setup = {
            "model": args.model,
            "attention": args.attention,
            "heads": origin,
            "heads_metrics": heads.metrics,
            "rank_accuracy": heads.rank_accuracy,
            "prompts": prompts,
            "max_new_tokens": args.max_new_tokens,
            "chat": args.chat,
            "threads": torch.get_num_threads(),
        }
        Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
