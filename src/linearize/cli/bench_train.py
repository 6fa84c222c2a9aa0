"""``linearize bench train``: training speed of both stages and the perplexity they recover."""

from __future__ import annotations

import argparse

from linearize.bench import training
from linearize.cli.options import add_config_arguments, config_from_args
from linearize.cli.train import ProgressBars


def register(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser(
        "train", help="stage 1 / stage 2 tokens/s vs transformers, perplexity before and after"
    )
    add_config_arguments(parser, training.TrainBenchConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, training.TrainBenchConfig)
    bars = ProgressBars()
    results, out = training.bench_train(
        config, callback=bars, report=lambda message: print(message, flush=True)
    )
    bars.close()
    print(training.summary(results, out))
    return 0
