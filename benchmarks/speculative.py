"""Speculative decoding benchmark: ``python benchmarks/speculative.py [bench speculative options]``.

A thin wrapper over ``linearize bench speculative`` (see its ``--help``) with this script's
defaults first (SmolLM2-135M linearized with "augmented", Medusa heads trained on 30k Austen
tokens when none are found, an 8-layer draft, chat template on); later options win. A saved model
directory: ``--model DIR --attention none``. Trees and draft depths are comma-separated
(``--trees tree-2,tree-4``); ``--out results/speculative.json`` writes that record.
"""

from __future__ import annotations

import sys

from linearize.cli import main

DEFAULTS = ["--attention", "augmented", "--train-tokens", "30000", "--draft-layers", "8", "--chat"]

if __name__ == "__main__":
    sys.exit(main(["bench", "speculative", *DEFAULTS, *sys.argv[1:]]))
