"""Decode benchmark: ``python benchmarks/decode.py [bench decode options]``.

A thin wrapper over ``linearize bench decode`` (see ``linearize bench decode --help``); by default
it measures SmolLM2-135M and the same model linearized with the augmented attention (untrained:
speed does not depend on training), and llama.cpp when llama-cpp-python is installed.
"""

from __future__ import annotations

import sys

from linearize.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["--model", "smollm2-135m", "--attention", "augmented"]
    sys.exit(main(["bench", "decode", *args]))
