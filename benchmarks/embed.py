"""End-to-end embedding rate against its two bounds, measured in the same run.

    .venv/bin/python benchmarks/embed.py [--images 256] [--vit-images 48] [--size 512] [--workers 2]

For a tiny model (tiny-clip) and for ViT-B/16 (clip, random init) it prints images/s of:
  pipeline   `embed`: decode + preprocess in DataLoader workers + model + LanceDB writes
  forward    the raw model forward on ready tensors (no decoding)
  decode     decode + preprocess alone, through the same DataLoader
and the pipeline's ratio to the lower of the two bounds (target: at least 0.8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from embedkit.data import nih, synth
from embedkit.data.cohort import import_cohort, validate_cohort
from embedkit.embed import ImageFiles, embed_cohort
from embedkit.models.registry import get_spec, instantiate
from embedkit.store.store import Store


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench(model_name: str, folder: Path, frame, batch_size: int, workers: int) -> None:
    spec = get_spec(model_name)
    model, weights_id, source = instantiate(spec, random_init=True, seed=0)
    model.eval()
    paths = [str(folder / i) for i in frame["image_id"]]
    transform = model.image_transform()

    def loader():
        return torch.utils.data.DataLoader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers,
                                           multiprocessing_context="forkserver" if workers else None)

    start = time.perf_counter()
    batches = [pixels for _, pixels in loader()]
    t_decode = time.perf_counter() - start

    with torch.inference_mode():
        model.encode_image(batches[0])  # warm-up
        start = time.perf_counter()
        for pixels in batches:
            model.encode_image(pixels)
        t_forward = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        import_cohort(store, validate_cohort(frame, "bench", images_dir=folder, verify_images=False), "bench")
        start = time.perf_counter()
        summary = embed_cohort(store, spec, model, weights_id, source, "bench", device="cpu",
                               batch_size=batch_size, workers=workers, progress=False)
        t_pipeline = time.perf_counter() - start
    n = len(paths)
    r_pipe, r_fwd, r_dec = rate(n, t_pipeline), rate(n, t_forward), rate(n, t_decode)
    bound = min(r_fwd, r_dec)
    limit = "compute" if r_fwd < r_dec else "decoding"
    print(f"{model_name:<10} {n:>5} images  pipeline {r_pipe:7.1f} img/s | forward {r_fwd:7.1f} | decode+preprocess "
          f"{r_dec:7.1f} | bound ({limit}) {bound:7.1f} | pipeline/bound {r_pipe / bound:.2f} "
          f"({'meets' if r_pipe / bound >= 0.8 else 'misses'} the 0.8 target)")
    assert summary.rows == n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images for the tiny model")
    parser.add_argument("--vit-images", type=int, default=48, help="images for ViT-B/16")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (NIH PNGs are 1024)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, DataLoader workers {args.workers}, images {args.size} px")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        frame = nih.shipped_manifest("nih6x200").head(max(args.images, args.vit_images))
        synth.synthesize(frame, folder, size=args.size, seed=0)
        bench("tiny-clip", folder, frame.head(args.images), args.batch_size, args.workers)
        bench("clip", folder, frame.head(args.vit_images), args.batch_size, args.workers)


if __name__ == "__main__":
    main()
