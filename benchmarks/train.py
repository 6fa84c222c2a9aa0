"""Training benchmark: ``python benchmarks/train.py --transfer-tokens 6144 --finetune-tokens 3072``.

A thin wrapper over ``linearize bench train`` (see ``linearize bench train --help``): stage 1
and stage 2 tokens/s beside transformers' full fine-tuning, and the perplexity they recover.
"""

from __future__ import annotations

import sys

from linearize.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
