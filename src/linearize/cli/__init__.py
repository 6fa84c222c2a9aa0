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
    "linearize.cli.export",
    "linearize.cli.check",
    "linearize.cli.generate",
    "linearize.cli.train",
    "linearize.cli.evaluate",
    "linearize.cli.bench",
    "linearize.cli.demo",
    "linearize.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linearize",
        description="Turn pretrained LLMs into linear-attention LLMs, train and serve them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (developers)"
    )
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        return report_error(e)


# What a user can cause: a bad value or type (ours: ValueError/TypeError), a file or folder that
# cannot be read or written (OSError), a model that breaks at run time (RuntimeError: NaN guards,
# out of memory). Anything else is a bug in linearize.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def report_error(error: Exception) -> int:
    """Print ``error`` as one line on stderr; exit code 2 for user errors, 1 for bugs."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None:
        text = f"{error.strerror or text}: {error.filename}"
    if isinstance(error, USER_ERRORS):
        print(f"error: {text}", file=sys.stderr)
        return 2
    print(
        f"internal error ({type(error).__name__}): {text}; this is a bug in linearize, please "
        "report it with the output of `linearize --debug ...`",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
