"""The sharded embedding pass at 1, 2 and 4 shards on this machine: wall time and the scaling ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py [--images 192] [--size 256] [--model tiny-medclip-rn50]

Each shard is a separate `embed --shard I/N` process (as N workers of a scheduler would run them), all started
together; the time is from their start to the end of the one `embed --commit-shards N`. The ratio printed is
(1-shard time) / (N-shard time): on a machine with N free cores, about N for a pass that decoding and the forward
bound. Process start (torch import, model build) is part of each shard's time, as it is on a cluster.

    PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py --executors [--models tiny-clip,tiny-gloria] [--cpus 2]

The study executors' overhead: the tiny study matrix (24 images, zero-shot + lp + mlp, seeds 1-2, random init)
run by the in-process executor and by the Ray executor (a local cluster of --cpus CPUs, started before the clock),
each into a fresh store. The ratio printed is (ray time) / (in-process time): below 1 where the cluster runs steps
side by side, above where task start-up (a worker importing torch, opening the store) costs more than it saves.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def executors(models: str, cpus: int) -> None:
    """The tiny matrix by the in-process and by the Ray executor; prints both times and their ratio."""
    import ray

    from conftest import write_cohort_images
    from embedkit.data.cohort import import_cohort, validate_cohort
    from embedkit.store.store import Store
    from embedkit.study import make_config, run_study

    config = make_config(name="bench", models=models, methods="zeroshot,lp,mlp", seeds="1,2", cohort="c",
                         random_init=True, probe_epochs=2, ci=0, workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        frame = write_cohort_images(folder, n_per_class=4, size=64)
        stores = {}
        for name in ("local", "ray"):
            stores[name] = Store(Path(tmp) / name)
            import_cohort(stores[name], validate_cohort(frame, "c", images_dir=folder), "c")
        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        started = time.perf_counter() - start
        times, steps = {}, {}
        for name in ("local", "ray"):
            start = time.perf_counter()
            result = run_study(stores[name], config, progress=False, executor=name)
            times[name], steps[name] = time.perf_counter() - start, len(result.run)
        ray.shutdown()
    print(f"tiny matrix: {models}, zeroshot+lp+mlp, seeds 1-2: {steps['local']} steps (report included)")
    print(f"in-process executor {times['local']:.1f} s | ray executor ({cpus} CPUs, start-up {started:.1f} s "
          f"not counted) {times['ray']:.1f} s | ray / in-process {times['ray'] / times['local']:.2f}x")
    print(f"cores: {os.cpu_count()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", default="tiny-medclip-rn50")
    parser.add_argument("--executors", action="store_true", help="the study executors' overhead instead")
    parser.add_argument("--models", default="tiny-clip,tiny-gloria")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    if args.executors:
        executors(args.models, args.cpus)
        return
    from conftest import write_cohort_images

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        frame = write_cohort_images(folder, n_per_class=max(1, args.images // 15), size=args.size)
        manifest = Path(tmp) / "m.csv"
        frame.to_csv(manifest, index=False)
        cli = [sys.executable, "-m", "embedkit.cli"]
        times = {}
        for n in (1, 2, 4):
            store = Path(tmp) / f"store{n}"
            subprocess.run(cli + ["--store", str(store), "data", "import", str(manifest), "--images", str(folder),
                                  "--cohort", "c"], check=True, env=env, capture_output=True)
            embed = cli + ["--store", str(store), "embed", "--model", args.model, "--random-init", "--cohort", "c",
                           "--workers", "0", "--quiet"]
            start = time.perf_counter()
            procs = [subprocess.Popen(embed + ["--shard", f"{i}/{n}"], env=env, stdout=subprocess.DEVNULL)
                     for i in range(n)]
            assert all(p.wait() == 0 for p in procs)
            subprocess.run(embed + ["--commit-shards", str(n)], check=True, env=env, capture_output=True)
            times[n] = time.perf_counter() - start
            print(f"{n} shard(s): {len(frame)} images in {times[n]:.1f} s "
                  f"({len(frame) / times[n]:.1f} images/s), scaling ratio {times[1] / times[n]:.2f}x", flush=True)
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
