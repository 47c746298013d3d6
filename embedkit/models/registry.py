"""One registry: a model name maps to a small spec; each family module owns how it builds and loads.

Adding a model is one entry here plus, for a new family, one module under ``embedkit/models/``.
Family modules are imported lazily (they pull in torch, open_clip or transformers).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.constants import WEIGHTS_ENV
from embedkit.errors import EmbedkitError


class UnknownModelError(EmbedkitError, ValueError):
    pass


class MissingWeightsError(EmbedkitError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    """What embedkit needs to know about one model name.

    ``family`` names the module ``embedkit.models.<family>`` which provides
    ``build(spec, seed) -> VisionLanguageModel`` (real architecture, random weights) and
    ``load(spec, path) -> VisionLanguageModel`` (the authors' released weights, strict after key clean-up).
    """

    name: str
    family: str
    config: str  # the family's own architecture name (e.g. "ViT-B-16-quickgelu", "swin", "tiny")
    embed_dim: int
    zeroshot_rule: str  # "scaled_cosine" | "medclip" | "gloria"
    prompt_style: str  # "clip" | "chexpert"
    weight_files: tuple[str, ...]  # what the user must download (relative to the model's weights folder)
    weight_source: str  # where users get them
    lora_rank: int = 16  # the paper's LoRA rank for this image tower
    tiny: bool = False
    description: str = ""
    extra: dict = field(default_factory=dict)

    def family_module(self):
        return importlib.import_module(f"embedkit.models.{self.family}")

    def build(self, seed: int = 0):
        """Build the real architecture with random weights (deterministic for ``seed``)."""
        return self.family_module().build(self, seed)

    def load(self, path: str | Path):
        """Load the authors' released weights from ``path`` (a file or folder, per MODELS.md)."""
        path = Path(path)
        if not path.exists():
            raise MissingWeightsError(self.missing_message(path))
        model = self.family_module().load(self, path)
        _refuse_non_finite(model, path)
        return model

    def missing_message(self, where: Path | None) -> str:
        files = ", ".join(self.weight_files)
        place = f" at {where}" if where else ""
        return (
            f"No weights for model '{self.name}'{place}. It needs: {files}. Get them from {self.weight_source}, "
            f"then pass --weights PATH, or put them in $EMBEDKIT_WEIGHTS/{self.name}/; "
            f"or run with --random-init for random weights (labelled random-init in the store)."
        )

    def find_weights(self, weights_dir: str | Path | None = None) -> Path | None:
        """Look for this model's files in ``weights_dir`` (or $EMBEDKIT_WEIGHTS)/<name>/; None if absent."""
        root = weights_dir or os.environ.get(WEIGHTS_ENV)
        if not root:
            return None
        folder = Path(root) / self.name
        if not folder.is_dir():
            return None
        if all((folder / f).exists() for f in self.weight_files):
            return folder
        return None


OPENAI_CLIP_SOURCE = (
    "https://huggingface.co/timm/vit_base_patch16_clip_224.openai (open_clip_model.safetensors), "
    "or open_clip's 'openai' pretrained tag"
)
BIOMEDCLIP_SOURCE = "https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (all files)"
CLINICAL_BERT_VOCAB = "vocab.txt from https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT"
MEDCLIP_SOURCE = "the MedCLIP authors' release (github.com/RyanWangZf/MedCLIP, README 'pretrained weights'): unzip"
GLORIA_SOURCE = ("the GLoRIA authors' release (github.com/marshuang80/gloria, README 'pretrained models'); "
                 + CLINICAL_BERT_VOCAB)

_SPECS: list[ModelSpec] = [
    ModelSpec("clip", "openclip", "ViT-B-16-quickgelu", 512, "scaled_cosine", "clip",
              ("open_clip_model.safetensors",), OPENAI_CLIP_SOURCE, lora_rank=16,
              description="OpenAI CLIP ViT-B/16 (QuickGELU), the general-domain baseline"),
    ModelSpec("biomedclip", "openclip", "biomedclip", 512, "scaled_cosine", "clip",
              ("open_clip_config.json", "open_clip_pytorch_model.bin", "vocab.txt", "tokenizer_config.json"),
              BIOMEDCLIP_SOURCE, lora_rank=16,
              description="BiomedCLIP: timm ViT-B/16 + PubMedBERT, trained on PMC-15M"),
    ModelSpec("medclip-rn50", "medclip", "resnet50", 512, "medclip", "chexpert",
              ("pytorch_model.bin", "vocab.txt"), MEDCLIP_SOURCE + " medclip-pretrained.zip; " + CLINICAL_BERT_VOCAB, lora_rank=4,
              description="MedCLIP with a ResNet-50 image tower and Bio_ClinicalBERT"),
    ModelSpec("medclip-vit", "medclip", "swin", 512, "medclip", "chexpert",
              ("pytorch_model.bin", "vocab.txt"), MEDCLIP_SOURCE + " medclip-vit-pretrained.zip; " + CLINICAL_BERT_VOCAB, lora_rank=16,
              description="MedCLIP with a Swin-Tiny image tower ('ViT' in the paper) and Bio_ClinicalBERT"),
    ModelSpec("gloria", "gloria", "resnet50", 768, "gloria", "chexpert",
              ("chexpert_resnet50.ckpt", "vocab.txt"), GLORIA_SOURCE, lora_rank=4,
              description="GLoRIA ResNet-50 with global and local (word x region) features"),
]
# Tiny configurations: the same code paths at small widths, for tests and the demo (random init only).
_SPECS += [
    ModelSpec("tiny-" + s.name, s.family, "tiny-" + s.config, 48 if s.family == "gloria" else 32,
              s.zeroshot_rule, s.prompt_style, s.weight_files, s.weight_source, lora_rank=s.lora_rank, tiny=True,
              description=f"tiny {s.name} (same code path, small widths; tests and demo)")
    for s in list(_SPECS)
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> ModelSpec:
    """Return the spec of model ``name``; unknown names raise with the list of known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"Unknown model '{name}'. Known models: {', '.join(MODELS)}") from None


def random_init_id(name: str, seed: int) -> str:
    return f"random-init:{name}:{seed}"


def instantiate(spec: ModelSpec, weights: str | Path | None = None, random_init: bool = False, seed: int = 0,
                weights_dir: str | Path | None = None):
    """Build or load a model; returns ``(model, weights_id, source)``.

    ``random_init`` builds the real architecture with random weights, labelled ``random-init:<model>:<seed>``;
    otherwise weights come from ``weights``, or ``weights_dir`` / $EMBEDKIT_WEIGHTS ``/<model>/``, and are
    labelled by a content hash of what was loaded. No weights found is an error that says what to download.
    """
    from embedkit.models.base import state_dict_hash

    if random_init:
        return spec.build(seed), random_init_id(spec.name, seed), "random-init"
    if spec.tiny:
        raise MissingWeightsError(f"'{spec.name}' is a test configuration with no released weights: use --random-init")
    path = Path(weights) if weights else spec.find_weights(weights_dir)
    if path is None:
        raise MissingWeightsError(spec.missing_message(None))
    model = spec.load(path)
    return model, state_dict_hash(model), str(path)


def _refuse_non_finite(model, path: Path) -> None:
    """NaN or infinite weights would embed every image as NaN: refuse them before a pass starts, naming the tensor."""
    import torch

    from embedkit.models.base import CheckpointError

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight '{name}' holds NaN or infinite values; the file is damaged or "
                                  "was saved from a diverged run: use the released weights")
