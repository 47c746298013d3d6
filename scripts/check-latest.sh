#!/usr/bin/env bash
# The latest lane: install the newest releases pyproject.toml's ranges allow (torch/torchvision held to the pair in
# constraints.txt, the only one that imports on these machines) into .venv-latest/, print what differs from
# requirements.lock, and run the fast tests. A failure here means the next `bash scripts/lock.sh` would break
# the suite: fix the code (or a range) before re-locking. .ci/run runs this lane after the lock lane.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-latest/bin/python ] || "$PYTHON" -m venv .venv-latest
.venv-latest/bin/python -m pip install -q --upgrade pip
.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c constraints.txt -e '.[test]'
.venv-latest/bin/python -m pip check
echo "latest lane: releases that differ from requirements.lock"
.venv-latest/bin/python - <<'PY'
import re
from importlib import metadata

locked = dict(re.findall(r"^([A-Za-z0-9._-]+)==([^ \\]+)", open("requirements.lock").read(), re.M))
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
locked = {norm(k): v for k, v in locked.items()}
installed = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
changed = [f"  {n}: {locked.get(n, '(not locked)')} -> {v}" for n, v in sorted(installed.items())
           if n not in ("embedkit", "pip") and locked.get(n) != v]
print("\n".join(changed) or "  none")
PY
.venv-latest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider
