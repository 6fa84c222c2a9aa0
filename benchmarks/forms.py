"""Forms benchmark: ``python benchmarks/forms.py --lengths 1024,4096,16384 [--json]``.

A thin wrapper over ``linearize bench forms`` (see ``linearize bench forms --help``): time and
peak memory of the parallel, chunk and recurrent forms of one layer, against softmax (SDPA).
"""

from __future__ import annotations

import sys

from linearize.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "forms", *sys.argv[1:]]))
