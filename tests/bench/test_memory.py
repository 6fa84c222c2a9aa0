"""Peak RSS of an isolated run is the child's own, not the parent's."""

from __future__ import annotations

import os

import numpy as np

from linearize.bench.memory import peak_rss_bytes, run_isolated


def test_isolated_peak_is_the_childs_own():
    ballast = np.ones(600 * 2**20 // 8)  # the parent holds 600 MiB the child never touches
    parent = peak_rss_bytes()
    pid, child = run_isolated(os.getpid)
    assert pid != os.getpid()
    assert child < parent - 400 * 2**20, (child, parent)
    del ballast
