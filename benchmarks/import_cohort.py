"""Cohort import and synthetic generation rates, each beside a plain pandas read of the same CSV.

    .venv/bin/python benchmarks/import_cohort.py [--metadata ../shared/data/nih/Data_Entry_2017_v2020.csv.gz]

Prints: (1) importing the full NIH metadata (112,120 rows, --no-verify) into a fresh store, end to end
(read + protocol + validation + LanceDB upsert), against pd.read_csv of the same file; (2) the synthetic
generator's images/s at 256 px for 1200 images, against the same pandas read (how many CSV reads one image
generation costs is not meaningful, so the ratio printed is seconds per 1200 images vs seconds per CSV read).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from embedkit.data import nih, synth
from embedkit.data.cohort import import_cohort, validate_cohort
from embedkit.store.store import Store

DEFAULT_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", type=Path, default=DEFAULT_METADATA)
    parser.add_argument("--synth-images", type=int, default=1200)
    args = parser.parse_args()

    _, t_pandas = timed(lambda: pd.read_csv(args.metadata))
    print(f"baseline  pandas.read_csv of {args.metadata.name}: {t_pandas:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")

        def full_import():
            cohort = nih.full_cohort(nih.read_metadata(args.metadata))
            validated = validate_cohort(cohort, "nih", images_dir=Path(tmp) / "images", verify_images=False)
            return import_cohort(store, validated, "nih")

        result, t_import = timed(full_import)
        stages = {}
        meta, stages["read"] = timed(lambda: nih.read_metadata(args.metadata))
        cohort, stages["protocol"] = timed(lambda: nih.full_cohort(meta))
        _, stages["validate"] = timed(lambda: validate_cohort(cohort, "nih2", images_dir=Path(tmp), verify_images=False))
        print(f"import    full NIH, {result.imported} rows, --no-verify: {t_import:.2f} s "
              f"= {t_import / t_pandas:.1f}x the pandas read "
              f"({result.imported / t_import:,.0f} rows/s; read {stages['read']:.2f} s, protocol "
              f"{stages['protocol']:.2f} s, validate {stages['validate']:.2f} s, rest = store write)")

        frame = nih.shipped_manifest("nih6x200").head(args.synth_images)
        _, t_synth = timed(lambda: synth.synthesize(frame, Path(tmp) / "synth", size=256, seed=0))
        print(f"synth     {len(frame)} images at 256 px: {t_synth:.2f} s = {len(frame) / t_synth:.0f} images/s "
              f"= {t_synth / t_pandas:.1f}x the pandas read")


if __name__ == "__main__":
    main()
