"""The hostile-input corpus's harness (issue 14): a case is files the test writes, a command run through the real
CLI in a subprocess, and what the one error line must say. `tests/test_hostile_corpus.py` runs every case of the
`hostile_*.py` modules beside this one and asserts, for each:

- the exit code (1 for bad input or state, 2 for a usage error);
- stderr is one `error:` line (plus at most one `hint:` line) naming the row or file and giving the reason;
- no "Traceback" anywhere;
- the store is unchanged: every Lance table's version and row count, and every file's bytes, are what they were.

A case module defines ``CASES: list[Case]``. ``setup(tmp, store)`` writes the case's inputs under ``tmp`` (and may
break the store: the "before" snapshot is taken after setup); ``args`` may hold ``{tmp}`` and ``{store}``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import pandas as pd

# The store a case starts from: none at all, a folder with one imported cohort, or that cohort embedded with
# tiny-clip and scored zero-shot (one run).
StoreKind = Literal["none", "cohort", "embedded"]
# Files a failed command may leave in a store without changing it: lock files and the bug log (issue 14's
# "this is a bug" traceback goes there).
_NOT_CONTENT = ("_locks", "_logs")


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # after `embedkit --store {store}`
    reason: str  # a substring of the error line: why
    names: str = ""  # a substring of the error line naming the row, file, column or option ("" = the reason does)
    store: StoreKind = "none"
    setup: Callable[[Path, Path], None] | None = None
    code: int = 1
    env: dict[str, str] = field(default_factory=dict)


def embedkit(store: Path, args: list[str], env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`embedkit --store STORE ARGS` as a new process (the console entry point, exactly as a user runs it)."""
    full_env = {**os.environ, "EMBEDKIT_DEBUG": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "embedkit.cli", "--store", str(store), *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def snapshot(store: Path) -> dict:
    """What a command must not change: each Lance table's (version, rows) and each content file's digest."""
    if not store.exists():
        return {"exists": False}
    if store.is_file():
        return {"file": hashlib.sha256(store.read_bytes()).hexdigest()}
    files = {}
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store)
        if path.is_file() and rel.parts[0] not in _NOT_CONTENT:
            files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    tables = {}
    try:
        import lancedb

        db = lancedb.connect(str(store))
        for name in sorted(p.stem for p in store.glob("*.lance")):
            try:
                table = db.open_table(name)
                tables[name] = (table.version, table.count_rows())
            except Exception as exc:  # a broken table's state is its error (a case may break one on purpose)
                tables[name] = type(exc).__name__
    except Exception as exc:
        tables = {"<connect>": type(exc).__name__}
    return {"files": files, "tables": tables}


def small_manifest(folder: Path, n_per_class: int = 2, size: int = 32) -> Path:
    """A tiny valid cohort: PNGs in ``folder/images`` and ``folder/manifest.csv`` listing them."""
    from conftest import write_cohort_images

    frame: pd.DataFrame = write_cohort_images(folder / "images", n_per_class=n_per_class, size=size)
    manifest = folder / "manifest.csv"
    frame.to_csv(manifest, index=False)
    return manifest


def build_store(kind: StoreKind, root: Path) -> Path:
    """A store of ``kind`` under ``root`` (built through the CLI, as a user would)."""
    store = root / "store"
    if kind == "none":
        return store
    manifest = small_manifest(root / "cohort")
    steps = [["data", "import", str(manifest), "--images", str(root / "cohort" / "images"), "--cohort", "c"]]
    if kind == "embedded":
        steps += [["embed", "--model", "tiny-clip", "--random-init", "--cohort", "c", "--device", "cpu", "--quiet"],
                  ["zeroshot", "--model", "tiny-clip", "--cohort", "c"]]
    for args in steps:
        result = embedkit(store, args)
        assert result.returncode == 0, (args, result.stderr)
    return store


def copy_store(template: Path, to: Path) -> Path:
    if template.exists():
        shutil.copytree(template, to, symlinks=True)
    return to
