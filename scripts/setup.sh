#!/usr/bin/env bash
# Create ./.venv with exactly the packages of requirements.lock (hash-checked, no resolver, nothing unlisted),
# then embedkit itself in editable mode. The lock is for Linux x86_64 / CPython 3.11, the development and CI
# machines; scripts/lock.sh rewrites it. Idempotent: a second run installs nothing new.
# GPU users and other platforms: install your own torch build first, then `pip install -e '.[test]'` (the ranges
# in pyproject.toml); the lock's torch is the CUDA wheel PyPI serves for Linux x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements.lock
# --no-build-isolation: build embedkit with the locked setuptools instead of whatever the index serves today
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check
.venv/bin/python -c "import torch, torchvision, open_clip, lancedb, duckdb; print('embedkit environment ready: torch', torch.__version__)"
