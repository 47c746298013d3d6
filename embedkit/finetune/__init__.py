"""LoRA and full fine-tuning: images streamed from disk through a model's image tower and the paper's LP head.

- :mod:`embedkit.finetune.lora`: which modules of each family's image tower get LoRA, and the peft wrapping.
- :mod:`embedkit.finetune.augment`: the paper's training augmentations, deterministic per (seed, epoch, image).
- :mod:`embedkit.finetune.train`: the training loop, checkpoints and exact resume, runs and predictions.

Submodules import torch and peft; import them where they are used (the CLI does so inside its command).
"""
