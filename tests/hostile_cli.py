"""Hostile-input cases: verbs run on cohorts and runs they cannot use as asked (see tests/hostile.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from hostile import Case, embedkit, small_manifest


def _reimport(change: Callable) -> Callable[[Path, Path], None]:
    """Import cohort 'c' again (the same images, so its vectors stay valid) with ``change`` applied to the manifest."""
    def setup(tmp: Path, store: Path) -> None:
        import pandas as pd

        manifest = small_manifest(tmp / "cohort")
        frame = change(pd.read_csv(manifest, dtype=str))
        frame.to_csv(manifest, index=False)
        result = embedkit(store, ["data", "import", str(manifest), "--images", str(tmp / "cohort" / "images"),
                                  "--cohort", "c"])
        assert result.returncode == 0, result.stderr

    return setup


def _no_split(frame):
    return frame.drop(columns="split")


def _ages_spread(frame):
    return frame.assign(age=[str(20 + 5 * i) for i in range(len(frame))])  # 12 distinct ages


CASES = [
    # a cohort imported without a split column: zero-shot scores it; trained heads say what is missing
    Case("probe-on-a-cohort-without-splits", ("probe", "--model", "tiny-clip", "--cohort", "c", "--epochs", "1"),
         "has no split column (no row is train, val or test)", names="cohort 'c'", store="embedded",
         setup=_reimport(_no_split)),
    Case("sweep-on-a-cohort-without-splits", ("sweep", "--model", "tiny-clip", "--cohort", "c", "--epochs", "1",
                                              "--seeds", "0", "--quiet"),
         "add a split column (train/val/test) to the manifest", names="cohort 'c'", store="embedded",
         setup=_reimport(_no_split)),
    # a continuous attribute: refused with what to slice by instead, not one column per age
    Case("fairness-by-a-continuous-column", ("fairness", "--by", "age", "--split", "train", "--ci", "0"),
         "is a number with 12 distinct values", names="--by age", store="embedded", setup=_reimport(_ages_spread)),
    Case("report-by-a-continuous-column", ("report", "--by", "sex,age", "--out", "{tmp}/report", "--ci", "0"),
         "slice by age_group (old from 60)", names="--by age", store="embedded", setup=_reimport(_ages_spread)),
    Case("fairness-by-an-unknown-column", ("fairness", "--by", "sex,ethnicity", "--split", "train", "--ci", "0"),
         "unknown attribute 'ethnicity'", store="embedded"),
    Case("fairness-on-a-split-never-scored", ("fairness", "--split", "test", "--ci", "0"),
         "no run with predictions matches split='test'", store="embedded"),
]
