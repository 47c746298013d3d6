"""Hostile-input cases: broken, missing or misplaced stores (see tests/hostile.py)."""

from __future__ import annotations

from pathlib import Path

from hostile import Case


def _store_is_a_file(tmp: Path, store: Path) -> None:
    store.write_text("x")


CASES = [
    Case(f"store-is-a-file-{verb[0]}", verb, "is a file, not a folder", names="{store}", setup=_store_is_a_file)
    for verb in (("runs",), ("doctor",), ("sql", "SELECT 1"), ("data", "info"))
]
