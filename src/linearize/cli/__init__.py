"""The ``linearize`` command line: one subcommand per module of this package.

Each module in ``COMMANDS`` defines ``register(subparsers)`` (adds its parser(s), setting
``func`` to a ``run(args) -> int`` function). Only the CLI prints; the library logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = (
    "linearize.cli.models",
    "linearize.cli.check",
    "linearize.cli.generate",
    "linearize.cli.train",
    "linearize.cli.evaluate",
    "linearize.cli.bench",
    "linearize.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linearize",
        description="Turn pretrained LLMs into linear-attention LLMs, train and serve them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a command not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
