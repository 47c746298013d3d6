"""Prepared GPU check: embed the 1200 synthetic images with each of the five models (random init, bf16).

    .venv/bin/python benchmarks/gpu_embed.py                      # on a GPU machine: all five, batch 256
    .venv/bin/python benchmarks/gpu_embed.py --device cpu --limit 32 --models tiny-clip,tiny-gloria --batch-size 8

Prints, per model, images/s of the whole `embed` pass (decode + preprocess + model + LanceDB writes) and the peak
GPU memory (torch.cuda.max_memory_allocated; nan on CPU). Record the figures, device and date in RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from embedkit.data import nih, synth
from embedkit.data.cohort import import_cohort, validate_cohort
from embedkit.embed import embed_cohort
from embedkit.models.registry import get_spec, instantiate
from embedkit.store.store import Store

MODELS = "clip,biomedclip,medclip-rn50,medclip-vit,gloria"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--limit", type=int, default=1200, help="images (1200 = the whole synthetic cohort)")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {device_name}, batch {args.batch_size}, workers {args.workers}, {args.limit} images")
    with tempfile.TemporaryDirectory() as tmp:
        frame = nih.shipped_manifest("nih6x200").head(args.limit)
        synth.synthesize(frame, Path(tmp) / "img", size=args.size, seed=0)
        store = Store(Path(tmp) / "store")
        import_cohort(store, validate_cohort(frame, "synthetic", images_dir=Path(tmp) / "img"), "synthetic")
        for name in args.models.split(","):
            spec = get_spec(name)
            model, weights_id, source = instantiate(spec, random_init=True, seed=0)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            summary = embed_cohort(store, spec, model, weights_id, source, "synthetic", device=args.device,
                                   batch_size=args.batch_size, workers=args.workers, progress=False)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else math.nan
            print(f"{name:<14} {summary.images} images in {seconds:6.1f} s = {summary.images / seconds:7.1f} img/s "
                  f"(model loop {summary.images_per_second:7.1f} img/s), peak memory {peak:.2f} GiB")
            del model
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
