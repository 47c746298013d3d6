"""One epoch of LoRA and one of full fine-tuning per model on a GPU: images/s and peak GPU memory.

    .venv/bin/python benchmarks/gpu_finetune.py                      # GPU: clip + biomedclip, 1200 images, bf16
    .venv/bin/python benchmarks/gpu_finetune.py --device cpu --limit 24 --models tiny-clip,tiny-biomedclip

Writes the synthetic NIH 6x200 cohort (1200 images, 256 px, real ages/sexes/splits: 840 train, 120 val,
240 test; ``--limit N`` keeps N of them, every split represented) into a temporary store, then runs
``embedkit.finetune.train.finetune`` for one epoch per (model, method) with random-init weights, exactly as
``embedkit finetune --epochs 1 --random-init`` would: train pass (augmented, streamed through DataLoader workers),
val pass, prediction of every row, run written. Prints per run: the train pass's images/s (counted from its first
batch, so worker start-up is left out), the whole run's wall time (model build, start-up, val and prediction passes
included), trainable parameters and ``torch.cuda.max_memory_allocated`` (reset before each run), then the LoRA/FT
ratios per model. The first run also pays for CUDA/cuDNN warm-up (its images/s are a little low).

    .venv/bin/python benchmarks/gpu_finetune.py --cache [--cache-images 360] [--size 1024]

Instead: an epoch from the PNGs against an epoch from the pixel cache (benchmarks/finetune.py --cache, run on this
device), LoRA, per model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def synthetic_cohort(folder: Path, limit: int | None, size: int, seed: int) -> pd.DataFrame:
    """The shipped nih6x200 manifest (or ``limit`` rows of it, split proportions kept) with synthetic PNGs."""
    from embedkit.data import nih, synth

    frame = nih.shipped_manifest("nih6x200")
    if limit is not None and limit < len(frame):
        share = {s: max(2, round(limit * n / len(frame))) for s, n in frame["split"].value_counts().items()}
        frame = pd.concat([g.sample(n=min(share[s], len(g)), random_state=seed) for s, g in frame.groupby("split")])
    synth.synthesize(frame, folder, size=size, seed=seed)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="clip,biomedclip", help="comma-separated model names")
    parser.add_argument("--methods", default="lora,ft")
    parser.add_argument("--limit", type=int, default=None, help="use only N images (smoke test on a CPU)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--amp", default="bf16", help="bf16 | fp16 | none (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic PNGs")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--cache", action="store_true", help="an epoch from PNGs vs from the pixel cache")
    parser.add_argument("--cache-images", type=int, default=360, help="--cache: images in the cohort")
    args = parser.parse_args()
    if args.cache:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from finetune import cache_epochs

        cache_epochs(args.models.split(","), args.cache_images, args.size, args.batch_size, args.workers,
                     device=args.device, amp=args.amp)
        return

    from embedkit.data.cohort import import_cohort, validate_cohort
    from embedkit.device import resolve_device
    from embedkit.finetune.train import FinetuneConfig, finetune
    from embedkit.store.store import Store

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        start = time.perf_counter()
        frame = synthetic_cohort(root / "images", args.limit, args.size, seed=0)
        store = Store(root / "store")
        import_cohort(store, validate_cohort(frame, "bench", images_dir=root / "images"), "bench")
        n_train = int((frame["split"] == "train").sum())
        print(f"{len(frame)} synthetic images ({n_train} train) written and imported in "
              f"{time.perf_counter() - start:.1f} s")
        gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"device {gpu}, torch {torch.__version__}, amp {args.amp if cuda else 'none (cpu)'}, "
              f"batch {args.batch_size}, {args.workers} workers")
        results: dict[tuple[str, str], tuple[float, float]] = {}
        for name in args.models.split(","):
            for method in args.methods.split(","):
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                config = FinetuneConfig(model=name, method=method, cohort="bench", random_init=True, epochs=1,
                                        batch_size=args.batch_size, amp=args.amp, device=str(device),
                                        workers=args.workers)
                start = time.perf_counter()
                result = finetune(store, config, progress=False)
                wall = time.perf_counter() - start
                rate = result.history[0]["images_per_second"]
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
                results[(name, method)] = (rate, peak)
                print(f"{name:<16} {method:<4} train {rate:8.1f} img/s   run {wall:7.1f} s   "
                      f"{result.trainable_params:>12,} trainable   peak {peak:6.2f} GiB")
        for name in args.models.split(","):
            if (name, "lora") in results and (name, "ft") in results:
                (r_l, m_l), (r_f, m_f) = results[(name, "lora")], results[(name, "ft")]
                print(f"{name:<16} LoRA / FT: images/s x{r_l / r_f:.2f}, peak memory x{m_l / m_f:.2f}"
                      if cuda else f"{name:<16} LoRA / FT: images/s x{r_l / r_f:.2f}")


if __name__ == "__main__":
    main()
