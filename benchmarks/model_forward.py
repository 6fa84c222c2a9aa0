"""Model forward benchmark: ``python benchmarks/model_forward.py [--contexts 1024,8192] [--json]``.

A thin wrapper over ``linearize bench forward`` (see ``linearize bench forward --help``): the
softmax SmolLM2-135M vs the same model linearized (augmented) vs transformers' ``generate()``.
"""

from __future__ import annotations

import sys

from linearize.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "forward", *sys.argv[1:]]))
