"""Prepared GPU check: embed synthetic X-rays with each of the five models, then with all five in one pass.

    .venv/bin/python benchmarks/gpu_embed.py                      # on a GPU machine: all five, batch 256
    .venv/bin/python benchmarks/gpu_embed.py --device cpu --limit 32 --models tiny-clip,tiny-gloria --batch-size 8

Random-init weights, fp32 (``--amp bf16`` to autocast). Prints, per model, images/s of the whole `embed` pass
(decode + preprocess + model + LanceDB writes), the mean GPU utilisation during it (nvidia-smi; nan without
one) and the peak GPU memory (torch.cuda.max_memory_allocated; nan on CPU); then the same for one pass of every
model (each image decoded once: ``embed --model a,b,...``) and its speed-up over the one-model passes. ``--size``
is the PNGs' side: 1024 (NIH's) by default. Record the figures, device and date in RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from embed import synthesize_at  # benchmarks/embed.py's NIH-sized synthetic X-rays
from embedkit.data import nih
from embedkit.data.cohort import import_cohort, validate_cohort
from embedkit.embed import ToEmbed, embed_cohort, embed_models
from embedkit.models.registry import get_spec, instantiate
from embedkit.store.store import Store
from gpu_sampling import Utilisation

MODELS = "clip,biomedclip,medclip-rn50,medclip-vit,gloria"


def peak_gib(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--limit", type=int, default=1200, help="images (1200 = the whole synthetic cohort)")
    parser.add_argument("--size", type=int, default=1024, help="synthetic image side (NIH: 1024)")
    parser.add_argument("--amp", default="none", help="none | bf16 | fp16 (CUDA only)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device {device_name}, batch {args.batch_size}, workers {args.workers}, {args.limit} images at "
          f"{args.size} px, amp {args.amp}")
    names = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        frame = nih.shipped_manifest("nih6x200").head(args.limit)
        synthesize_at(frame, Path(tmp) / "img", args.size)
        stores = [Store(Path(tmp) / name) for name in ("one-by-one", "together")]
        for store in stores:
            import_cohort(store, validate_cohort(frame, "synthetic", images_dir=Path(tmp) / "img"), "synthetic")
        separate = 0.0
        for name in names:
            spec = get_spec(name)
            model, weights_id, source = instantiate(spec, random_init=True, seed=0)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with Utilisation() as util:
                summary = embed_cohort(stores[0], spec, model, weights_id, source, "synthetic", device=args.device,
                                       batch_size=args.batch_size, workers=args.workers, progress=False,
                                       amp=args.amp)
            seconds = time.perf_counter() - start
            separate += seconds
            print(f"{name:<14} {summary.images} images in {seconds:6.1f} s = {summary.images / seconds:7.1f} img/s "
                  f"(model loop {summary.images_per_second:7.1f} img/s), GPU busy {util.mean:5.1f} %, "
                  f"peak memory {peak_gib(cuda):.2f} GiB")
            del model
            if cuda:
                torch.cuda.empty_cache()
        if len(names) > 1:
            models = [ToEmbed(get_spec(n), *instantiate(get_spec(n), random_init=True, seed=0)) for n in names]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with Utilisation() as util:
                summaries = embed_models(stores[1], models, "synthetic", device=args.device,
                                         batch_size=args.batch_size, workers=args.workers, progress=False,
                                         amp=args.amp)
            seconds = time.perf_counter() - start
            groups = summaries[-1].group[1]
            print(f"{len(names)}-model pass  {summaries[0].images} images in {seconds:6.1f} s = "
                  f"{summaries[0].images / seconds:7.1f} img/s ({groups} device group{'s' * (groups > 1)}), GPU "
                  f"busy {util.mean:5.1f} %, peak memory {peak_gib(cuda):.2f} GiB; one-model passes {separate:.1f} s "
                  f"in all: x{separate / seconds:.2f}")

if __name__ == "__main__":
    main()
