"""Training step time of LoRA against full fine-tuning, with trainable parameter counts, in one process.

    .venv/bin/python benchmarks/finetune.py [--models tiny-clip,clip] [--batch-size 8] [--steps 3]

For each model (random init; ``clip`` is open_clip's ViT-B/16, QuickGELU variant, built through embedkit's
registry), builds the network the way ``embedkit finetune`` does (LP head on the image tower; LoRA with the
model's default rank and targets, or every tower weight trainable), then times AdamW steps (forward, cross-entropy,
backward, update) on a fixed batch of random 224 px images, after one warm-up step. Prints the step time, images/s
and trainable parameters of each, and the ratios full FT / LoRA. Images are not decoded here: the step alone.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-clip,clip", help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    args = parser.parse_args()
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
