#!/usr/bin/env bash
# Create ./.venv and install embedkit with its test extras. torch/torchvision come first, pinned by
# constraints.txt (the pair that imports cleanly on the development and CI machines), and every later install
# carries the same constraints so pip can never swap torch. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
.venv/bin/python -c "import torch, torchvision, open_clip, lancedb, duckdb; print('embedkit environment ready: torch', torch.__version__)"
