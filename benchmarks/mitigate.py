"""Benchmark: a sweep under each in-processing mitigation against the plain sweep, and the acceptance demonstration.

Part 1 (cost). The same grid (4 configurations x 5 seeds, lp and mlp, hidden 256, 20 epochs) on 1200 x 512
random-but-learnable vectors (840 / 120 / 240, six classes, alternating sex and age group as in the heads tests)
trained by embedkit's batched sweep trainer plain and under each ``--mitigate``; prints runs/s and the ratio
to the plain sweep measured in the same process (CPU time; wall clock beside it).

Part 2 (what helps). The demo's planted-bias cohort (NIH 6x200 rows, sex=F:signal=0.3) and the same cohort
without a bias, embedded by tiny-clip at random init: an mlp baseline, each mitigation grouped by sex and the
post-hoc thresholds fitted on val, each compared with the baseline on test by the paired bootstrap
(`embedkit compare`): macro-F1 (the utility cost) and the sex F1 gap, with intervals.

Usage:  .venv/bin/python benchmarks/mitigate.py [--epochs 20] [--skip-demo] [--size 96] [--ci 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from embedkit.heads.mitigate import MITIGATIONS, Mitigation  # noqa: E402
from embedkit.heads.probe import HeadConfig  # noqa: E402
from embedkit.heads.sweep import expand, train_grid  # noqa: E402
from embedkit.heads.vectors import load_vectors  # noqa: E402
from embedkit.store.store import Store  # noqa: E402

PARAMS = {"groupdro": "groupdro:eta=0.1", "gap-penalty": "gap-penalty:lam=1"}


def sweep_cost(epochs: int, heads: list[str]) -> None:
    from heads_synth import write_vectors

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        write_vectors(store, "bench", 512)
        vectors = load_vectors(store, "bench")
        seeds = list(range(5))
        for head in heads:
            base = HeadConfig(head, epochs=epochs, hidden=256)
            grid = {"lr": [1e-4, 1e-3], "wd": [0.0, 1e-4]}
            rows = []
            for name in (None, *MITIGATIONS):
                mitigation = Mitigation.parse(PARAMS.get(name, name), "age_group_sex") if name else None
                configs = expand(base.with_(mitigate=mitigation), grid)
                fit = train_grid(vectors, configs, seeds)
                rows.append((name or "plain", len(configs) * len(seeds), fit.cpu_seconds, fit.seconds))
            plain_rate = rows[0][1] / rows[0][2]
            print(f"\n{head}: {rows[0][1]} runs per sweep, {epochs} epochs, hidden 256, 1200 x 512 vectors")
            print(f"{'mitigation':14s} {'runs/s (cpu)':>13s} {'runs/s (wall)':>14s} {'ratio to plain (cpu)':>21s}")
            for name, n, cpu, wall in rows:
                print(f"{name:14s} {n / cpu:13.2f} {n / wall:14.2f} {n / cpu / plain_rate:21.2f}")


def demonstration(size: int, ci: int) -> None:
    from embedkit.demo import DEMO_BIAS
    from embedkit.heads.whathelps import demo_cohort, mitigation_study, print_what_helps, what_helps

    base = HeadConfig("mlp", epochs=30, hidden=256, lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        for name, bias in (("planted bias " + DEMO_BIAS, DEMO_BIAS), ("no bias", None)):
            start = time.perf_counter()
            store = demo_cohort(Path(tmp) / name.split()[0], bias, size=size)
            runs = mitigation_study(store, "tiny-clip", base, ["gap-penalty:lam=2", "groupdro:eta=0.1", "reweight",
                                                              "resample"], ["thresholds", "thresholds:tpr"],
                                    by="sex")
            rows = what_helps(store, runs, ["sex"], ci=ci)
            print_what_helps(rows, ci, title=f"what helps: the demo cohort, {name} (tiny-clip random init, {size} px, "
                                             f"mlp baseline; {time.perf_counter() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--heads", default="lp,mlp")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--ci", type=int, default=1000)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.seterr(all="ignore")
    if not args.skip_sweep:
        sweep_cost(args.epochs, args.heads.split(","))
    if not args.skip_demo:
        demonstration(args.size, args.ci)


if __name__ == "__main__":
    main()
