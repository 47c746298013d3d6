"""The sharded embedding pass at 1, 2 and 4 shards on this machine: wall time and the scaling ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py [--images 192] [--size 256] [--model tiny-medclip-rn50]

Each shard is a separate `embed --shard I/N` process (as N workers of a scheduler would run them), all started
together; the time is from their start to the end of the one `embed --commit-shards N`. The ratio printed is
(1-shard time) / (N-shard time): on a machine with N free cores, about N for a pass that decoding and the forward
bound. Process start (torch import, model build) is part of each shard's time, as it is on a cluster.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", default="tiny-medclip-rn50")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
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
