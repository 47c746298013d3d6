"""Benchmark: the cost of committing runs as a unit, against the two plain appends it replaced, in the same run.

Baseline: what the store did before run commits were atomic: one append of the predictions, one of the runs rows
(two Lance commits, no lock, no journal, no duplicate check). Measured: ``Store.write_runs``: the runs lock, the
journal entry (written with fsync, removed after), the scan of stored runs for a run id or fingerprint already
there, the same two appends. Both write into stores that already hold ``--existing`` runs, since the duplicate
check reads the runs table; each case is repeated and the median taken.

Cases: one run of 1200 predictions (a probe) and one batch of 200 runs (a sweep: 240,000 predictions).

Usage:  .venv/bin/python benchmarks/store_commit.py [--repeat 5] [--existing 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedkit.store import schemas  # noqa: E402
from embedkit.store.store import Store, new_run_id  # noqa: E402

ROWS, CLASSES = 1200, 6


def _batch(n_runs: int, rng: np.random.Generator) -> tuple[list[dict], pa.Table]:
    runs = [{"run_id": new_run_id("lp"), "model": "m", "weights_id": "w", "method": "lp", "cohort": "c",
             "config": {"lr": float(rng.random()), "cohort_fingerprint": "sha256:x"}, "seed": i, "metrics": {}}
            for i in range(n_runs)]
    probs = rng.dirichlet(np.ones(CLASSES), size=n_runs * ROWS).astype(np.float32)
    offsets = np.arange(0, probs.size + 1, CLASSES, dtype=np.int32)
    preds = pa.table({
        "run_id": pa.array(np.repeat([r["run_id"] for r in runs], ROWS), pa.string()),
        "row_id": pa.array(np.tile([f"c/{i:05d}" for i in range(ROWS)], n_runs), pa.string()),
        "image_id": pa.array(np.tile([f"{i:05d}.png" for i in range(ROWS)], n_runs), pa.string()),
        "split": pa.array(np.tile(["test"] * ROWS, n_runs), pa.string()),
        "y_true": pa.array(rng.integers(0, CLASSES, n_runs * ROWS).astype(np.int32)),
        "y_pred": pa.array(probs.argmax(1).astype(np.int32)),
        "probs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(probs.reshape(-1))),
    })
    return runs, preds


def _two_appends(store: Store, runs: list[dict], preds: pa.Table) -> None:
    rows = [{**r, "config": str(r["config"]), "metrics": "{}"} for r in runs]
    store.append("predictions", preds, schemas.PREDICTIONS)
    store.append("runs", pa.Table.from_pylist(rows, schema=schemas.RUNS), schemas.RUNS)


def _time(existing: int, n_runs: int, repeat: int, atomic: bool, rng: np.random.Generator) -> float:
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "store")
            store.write_runs(*_batch(existing, rng))
            runs, preds = _batch(n_runs, rng)
            start = time.perf_counter()
            store.write_runs(runs, preds) if atomic else _two_appends(store, runs, preds)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--existing", type=int, default=200, help="runs already in the store")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"store already holding {args.existing} runs; median of {args.repeat}")
    for label, n_runs in (("one run (1200 predictions)", 1), ("200-run sweep (240,000 predictions)", 200)):
        base = _time(args.existing, n_runs, args.repeat, False, rng)
        atomic = _time(args.existing, n_runs, args.repeat, True, rng)
        print(f"{label:38s} two appends {base * 1e3:8.1f} ms | atomic commit {atomic * 1e3:8.1f} ms | "
              f"ratio {atomic / base:5.2f}x (+{(atomic - base) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
