"""Which torch device a command runs on: ``--device auto | cpu | cuda[:N]``, checked once, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedkit.errors import DeviceError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> "torch.device":
    """``auto``: CUDA when torch sees it, else the CPU; ``cuda[:N]`` on a machine without CUDA raises DeviceError."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked for, but torch sees no CUDA device here")
    return torch.device(device)


def autocast_context(device: "torch.device", amp: str):
    """The forward pass's precision context: fp32 (no autocast) unless ``amp`` (bf16, fp16) asks for it on CUDA;
    elsewhere always fp32 (the embedding pass refuses ``--amp`` off CUDA before it gets here)."""
    import contextlib

    import torch

    if device.type == "cuda" and amp != "none":
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()


def has_gpu(device: str) -> bool:
    """Whether ``device`` means a GPU, without touching one (``cuda`` counts: :func:`resolve_device` checks it)."""
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()
