"""Serving benchmark: ``python benchmarks/serve.py [bench serve options]``.

A thin wrapper over ``linearize bench serve`` (see ``linearize bench serve --help``): 8 streams
vs 1, a cached 2k-token system prompt, 100 idle sessions, the softmax original at 4k. A smoke run:
``--streams 1 --streams 2 --max-tokens 8 --system-tokens 128 --sessions 4 --softmax-context 256
--softmax-streams 2``.
"""

from __future__ import annotations

import sys

from linearize.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
