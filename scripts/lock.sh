#!/usr/bin/env bash
# Re-resolve requirements.lock: every package of the runtime and test environment, pinned with its hashes, for
# the development and CI machines (Linux x86_64, CPython 3.11). Inputs: pyproject.toml's ranges (with the test
# extra) and constraints.txt (the torch/torchvision pair). Run it after changing either, then commit the lock
# together with the change and run `bash .ci/run`. The resolver (uv, pinned below) lives in its own venv,
# .venv-lock/, so it never touches the project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PYTHON=${PYTHON:-python3}
[ -x .venv-lock/bin/uv ] && [ "$(.venv-lock/bin/uv --version | cut -d' ' -f2)" = "$UV_VERSION" ] || {
    "$PYTHON" -m venv .venv-lock
    .venv-lock/bin/python -m pip install -q "uv==$UV_VERSION"
}
# Seed the output with the current lock: uv keeps the versions already pinned in its output file, so adding a
# dependency adds its packages without moving every other pin (delete requirements.lock to re-resolve afresh).
# The seed is the lock's body, without the two header lines this script writes above it.
if [ -f requirements.lock ]; then grep -v '^# The lock\|^# with hashes' requirements.lock > requirements.lock.new; fi
.venv-lock/bin/uv pip compile pyproject.toml --extra test -c constraints.txt --generate-hashes \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet -o requirements.lock.new
{
    echo "# The lock: every package embedkit's development and CI environment installs (Linux x86_64, CPython 3.11),"
    echo "# with hashes. Written by scripts/lock.sh from pyproject.toml + constraints.txt; do not edit by hand."
    cat requirements.lock.new
} > requirements.lock
rm requirements.lock.new
echo "requirements.lock: $(grep -c '^[a-z0-9].*==' requirements.lock) packages pinned"
