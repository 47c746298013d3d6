"""What every model family provides: the interface the embedding pass, zero-shot and fine-tuning rely on."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from embedkit.errors import EmbedkitError


class VisionLanguageModel(nn.Module):
    """A CLIP-style model: an image tower and a text tower that map into one embedding space.

    Family modules subclass this and keep the authors' module names so checkpoints load 1:1.
    """

    embed_dim: int

    def image_transform(self) -> Callable:
        """Return a picklable callable PIL.Image -> float tensor [C, H, W], the authors' preprocessing."""
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize prompts the way the authors did (padding, max length, casing)."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image embeddings [B, embed_dim]."""
        raise NotImplementedError

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return L2-normalised text embeddings [P, embed_dim]."""
        raise NotImplementedError

    def zeroshot_logit_scale(self) -> float:
        """The multiplier applied to cosine similarities in zero-shot scoring (1.0 where none is learned)."""
        raise NotImplementedError

    def image_tower(self) -> nn.Module:
        """The image encoder whose parameters LoRA and full fine-tuning adapt."""
        raise NotImplementedError


def state_dict_hash(model: nn.Module) -> str:
    """Content hash of a model's weights: sha256 over parameter and buffer names and bytes, sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()[:16]


class CheckpointError(EmbedkitError, ValueError):
    """A weights file that cannot be read, or whose keys or shapes do not fit the model after the clean-up."""


def read_tensor_file(path, release: str, unwrap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a torch file holding a state dict (with ``unwrap``, also the
    ``{"state_dict": ...}`` of a training checkpoint).

    ``torch.load`` runs with ``weights_only=True``: a downloaded pickle never runs code. Any file that cannot be read
    so (truncated, malformed, a pickle of other objects) is one CheckpointError naming the file and ``release`` (what
    to download again); torch's own advice to retry with weights_only=False is never passed on.
    """
    import pickle
    from pathlib import Path

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(str(path), device="cpu")
            except SafetensorError as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); download {release} "
                                      "again") from None
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's restricted unpickler fails on garbage in many ways
        reason = "it holds objects other than tensors, which embedkit never unpickles" \
            if isinstance(exc, pickle.UnpicklingError) else "truncated, damaged or not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({type(exc).__name__}: {reason}); "
                              f"download {release} again") from None
    if unwrap and isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} should hold a plain state dict (name -> tensor) as {release} does; "
                              f"found {type(state).__name__}")
    return state


def _key_list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading strictly into ``model``: unexpected, missing, mis-shaped keys (named)."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    wrong_shape = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                   for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_key_list(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_key_list(missing)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_key_list(wrong_shape)}")
    return problems


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` into ``model``; any key that does not fit raises :class:`CheckpointError` naming the keys."""
    problems = key_mismatches(model, state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems) + "." + hint)
    model.load_state_dict(state, strict=True)
