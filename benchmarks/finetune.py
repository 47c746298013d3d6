"""Training step time of LoRA against full fine-tuning, with trainable parameter counts, in one process.

    .venv/bin/python benchmarks/finetune.py [--models tiny-clip,clip] [--batch-size 8] [--steps 3]

For each model (random init; ``clip`` is open_clip's ViT-B/16, QuickGELU variant, built through embedkit's
registry), builds the network the way ``embedkit finetune`` does (LP head on the image tower; LoRA with the
model's default rank and targets, or every tower weight trainable), then times AdamW steps (forward, cross-entropy,
backward, update) on a fixed batch of random 224 px images, after one warm-up step. Prints the step time, images/s
and trainable parameters of each, and the ratios full FT / LoRA. Images are not decoded here: the step alone.

    .venv/bin/python benchmarks/finetune.py --cache [--models tiny-medclip-rn50] [--images 120] [--size 1024]

An epoch from the PNGs against an epoch from the pixel cache: ``embedkit finetune`` (LoRA, 2 epochs, DataLoader
workers) on synthetic X-rays at ``--size`` px, once with ``pixel_cache=False`` and once reading the cache (its
one-off build timed apart); prints each second epoch's seconds (the first includes the workers' start) and the
ratio, and checks that both runs end with the same validation losses.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from PIL import Image

from embedkit.finetune.train import build_network, train_step
from embedkit.models.registry import get_spec


def step_seconds(name: str, method: str, batch_size: int, steps: int) -> tuple[float, int]:
    """Mean seconds per training step and the trainable parameter count of ``name`` under ``method``."""
    spec = get_spec(name)
    model = spec.build(0)
    net, _, info = build_network(model, method, n_classes=6, seed=77, rank=spec.lora_rank)
    if method == "ft":
        net.tower.train()
    shape = model.image_transform()(Image.new("L", (256, 256))).shape  # the family's input: channels and size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, *shape, generator=generator)
    labels = torch.randint(0, 6, (batch_size,), generator=generator)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-5)
    train_step(net, optimizer, pixels, labels)  # warm-up: allocations, AdamW state
    start = time.perf_counter()
    for _ in range(steps):
        train_step(net, optimizer, pixels, labels)
    return (time.perf_counter() - start) / steps, info["trainable_params"]


def cache_epochs(names: list[str], images: int, size: int, batch_size: int, workers: int, device: str = "cpu",
                 amp: str = "none") -> None:
    """Epoch seconds from PNGs vs from the pixel cache, per model (see the module docstring); also run by
    benchmarks/gpu_finetune.py --cache on a GPU."""
    import tempfile
    from pathlib import Path

    from embedkit.data import nih, pixels
    from embedkit.data.cohort import import_cohort, load_cohort, validate_cohort
    from embedkit.finetune.train import FinetuneConfig, finetune
    from embedkit.store.store import Store
    from embedkit.models.registry import get_spec

    sys.path.insert(0, str(Path(__file__).parent))
    from embed import synthesize_at  # the embedding benchmark's 1024 px synthetic X-rays

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        frame = nih.shipped_manifest("nih6x200").groupby(["split", "label"]).head(max(1, images // 18))
        frame = frame.reset_index(drop=True)
        synthesize_at(frame, folder, size)
        store = Store(Path(tmp) / "store")
        import_cohort(store, validate_cohort(frame, "c", images_dir=folder), "c")
        paths = list(dict.fromkeys(load_cohort(store, "c")["path"]))
        print(f"{len(paths)} images of {size} px (train {sum(frame.split == 'train')}), batch {batch_size}, "
              f"{workers} DataLoader workers, torch threads {torch.get_num_threads()}, device {device}, amp {amp}")
        for name in names:
            start = time.perf_counter()
            pixels.build(store, "c", paths, [get_spec(name).build(0).image_transform()], workers=workers)
            build_s = time.perf_counter() - start
            epochs = {}
            for cached in (False, True):
                config = FinetuneConfig(model=name, method="lora", cohort="c", random_init=True, epochs=2,
                                        batch_size=batch_size, workers=workers, lora_preset="embedkit",
                                        device=device, amp=amp)
                result = finetune(store, config, progress=False, pixel_cache=cached)
                epochs[cached] = result.history
            png, cache = epochs[False][1]["seconds"], epochs[True][1]["seconds"]
            same = [e["val_loss"] for e in epochs[False]] == [e["val_loss"] for e in epochs[True]]
            print(f"{name:<18} epoch from PNGs {png:6.2f} s, from the cache {cache:6.2f} s: x{png / cache:.2f} "
                  f"(cache built once in {build_s:.1f} s; same val losses: {same})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--cache", action="store_true", help="an epoch from PNGs vs from the pixel cache")
    parser.add_argument("--images", type=int, default=120, help="--cache: images in the cohort")
    parser.add_argument("--size", type=int, default=1024, help="--cache: image side in px (NIH's are 1024)")
    parser.add_argument("--workers", type=int, default=2, help="--cache: DataLoader workers")
    args = parser.parse_args()
    if args.cache:
        cache_epochs((args.models or "tiny-medclip-rn50").split(","), args.images, args.size, args.batch_size,
                     args.workers)
        return
    args.models = args.models or "tiny-clip,clip"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {args.batch_size}, "
          f"{args.steps} timed steps after 1 warm-up")
    for name in args.models.split(","):
        results = {}
        for method in ("lora", "ft"):
            seconds, params = step_seconds(name, method, args.batch_size, args.steps)
            results[method] = (seconds, params)
            print(f"{name:<12} {method:<4} {params:>12,} trainable  {seconds * 1000:9.1f} ms/step  "
                  f"{args.batch_size / seconds:7.2f} img/s")
        (t_lora, p_lora), (t_ft, p_ft) = results["lora"], results["ft"]
        print(f"{name:<12} ratio full FT / LoRA: step time x{t_ft / t_lora:.2f}, trainable parameters "
              f"x{p_ft / p_lora:.1f}")


if __name__ == "__main__":
    main()
