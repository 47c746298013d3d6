"""MedCLIP (RyanWangZf/MedCLIP): a ResNet-50 or Swin-Tiny image tower and a Bio_ClinicalBERT text tower.

Module names follow the authors' release so their ``pytorch_model.bin`` loads 1:1 (after the key clean-up in
:func:`clean_state_dict`): ``vision_model.model.*`` (torchvision ResNet-50 whose ``fc`` is the projection, or an
HF ``SwinModel``) with ``vision_model.projection_head`` for Swin, ``text_model.model.*`` (``BertModel`` with pooler),
``text_model.projection_head`` and ``logit_scale``. Facts: docs/models.md ("MedCLIP").
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from embedkit.models import bert
from embedkit.models.base import (RESNET_LAYOUT, UPSTREAM, CheckpointError, ModelFamily, Preprocessing, TowerLayout,
                                  VisionLanguageModel, gray_pixels, key_mismatches, read_tensor_file)
from embedkit.models.registry import MissingWeightsError, ModelSpec

# LoRA in every Swin block: the study's the query/key/value projections (the attention input), embedkit's also the
# output projection and both MLP layers. transformers 5 renamed Swin's modules; both namings are recognised so
# either version fine-tunes the same layers.
_SWIN_BLOCK = r"(?:.+\.)?encoder\.layers\.\d+\.blocks\.\d+"
SWIN_LAYOUT = TowerLayout("swin", _SWIN_BLOCK, ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                          ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                           "mlp.fc1", "mlp.fc2"))
SWIN_V4_LAYOUT = TowerLayout("swin", _SWIN_BLOCK,
                             ("attention.self.query", "attention.self.key", "attention.self.value"),
                             ("attention.self.query", "attention.self.key", "attention.self.value",
                              "attention.output.dense", "intermediate.dense", "output.dense"))

# Preprocessing constants of the authors' feature extractor (one grayscale channel).
PIXEL_MEAN = 0.5862785803043838
PIXEL_STD = 0.27950088968644304
IMAGE_SIZE = 224
CONTEXT_LENGTH = 77

LOGIT_SCALE_INIT = math.log(1 / 0.07)
# The authors' clamp, MedCLIPModel.compute_logits (MedCLIP @9c3396f, medclip/modeling_medclip.py):
# torch.clamp(logit_scale, 0, 4.6052) on the float32 parameter. 4.6052 is not log 100 (4.605170...): a saturated
# scale multiplies cosines by exp(4.6052) = 100.00296, not 100 (3e-3 apart in a score). The float32 value the
# clamp compares with.
LOGIT_SCALE_MAX = float(torch.tensor(4.6052, dtype=torch.float32))

WEIGHTS_FILE = "pytorch_model.bin"

# Tiny towers: the same classes at small widths (tests and demo). Swin keeps image 224, patch 4 and window 7,
# so 56 -> 28 -> 14 -> 7 patches per side divide into windows exactly as in the full model; depth 2 per stage
# exercises the shifted-window blocks too.
TINY_SWIN = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
TINY_RESNET_WIDTH = 16  # Bottleneck inner width per group (resnet50: 64); output channels stay 256 ... 2048

_RESNET_CONFIGS = {"resnet50": False, "tiny-resnet50": True}  # config -> tiny?
_SWIN_CONFIGS = {"swin": False, "tiny-swin": True}

# PIL modes above 8 bits: ``convert("L")`` clips them instead of rescaling, so they must be decoded first.
_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def _gray(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:
        raise ValueError(
            f"MedCLIP preprocessing got a {image.mode} (more than 8-bit) image; PIL would clip it. Decode it "
            f"with embedkit.data.images.decode_image, which rescales to 8-bit, before the transform."
        )
    return image.convert("L")


class _MedCLIPPreprocessing(Preprocessing):
    """What MedCLIP's two preprocessings share: grayscale pixels, then [0, 1] and the feature extractor's mean and
    std on one channel. A module-level class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, size: int = IMAGE_SIZE, mean: float = PIXEL_MEAN, std: float = PIXEL_STD) -> None:
        self.size = size
        self.mean = mean
        self.std = std

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        gray = torch.from_numpy(np.ascontiguousarray(pixels[:, :, 0]))
        return ((gray.to(torch.float32) / 255.0 - self.mean) / self.std).unsqueeze(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std})"


class MedCLIPTransform(_MedCLIPPreprocessing):
    """``upstream``: PIL image -> float tensor [1, 224, 224], the README feature extractor's pad-to-square,
    bicubic resize and normalisation."""

    def pixels(self, image: Image.Image) -> np.ndarray:
        gray = _gray(image)
        width, height = gray.size
        # Centre on a black square canvas at least 224 wide, so small images are padded rather than upscaled.
        side = max(self.size, width, height)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(gray, ((side - width) // 2, (side - height) // 2))
        return gray_pixels(canvas.resize((self.size, self.size), Image.Resampling.BICUBIC))

    def recipe(self) -> str:
        return f"medclip upstream: grayscale, centred on a black square, resize {self.size} bicubic (PIL)"


class MedCLIPStudyTransform(_MedCLIPPreprocessing):
    """``study``: PIL image -> float tensor [1, 224, 224] as the study's code preprocesses: grayscale, shortest side
    to 224 (bilinear; the long side truncated, as torchvision's Resize(224) computes it), centre crop 224
    (torchvision's rounded offsets), [0, 1], the feature extractor's mean and std.

    Not MedCLIP's own ZeroShotImageDataset (@9c3396f), which pads to a black square first and then resizes to
    (224, 224) bilinear: the two agree on square images only.
    """

    def pixels(self, image: Image.Image) -> np.ndarray:
        gray = _gray(image)
        width, height = gray.size
        short, long = sorted((width, height))
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if width <= height else (new_long, self.size)
        resized = gray.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left = int(round((new_w - self.size) / 2.0))
        top = int(round((new_h - self.size) / 2.0))
        return gray_pixels(resized.crop((left, top, left + self.size, top + self.size)))

    def recipe(self) -> str:
        return (f"medclip study: grayscale, shortest side {self.size} bilinear (PIL, long side truncated), "
                f"center crop {self.size}")


# ---------------------------------------------------------------------------------------------------------------
# Towers


def _as_three_channels(pixels: torch.Tensor) -> torch.Tensor:
    # Both towers were trained on grayscale repeated to 3 channels inside the vision model (the authors' way).
    return pixels.repeat(1, 3, 1, 1) if pixels.shape[1] == 1 else pixels


class ResNetVision(nn.Module):
    """torchvision ResNet whose ``fc`` (no bias) is the projection to the joint space: ``vision_model.model.*``."""

    def __init__(self, embed_dim: int, tiny: bool = False) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet, resnet50

        if tiny:
            self.model = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=TINY_RESNET_WIDTH)
        else:
            self.model = resnet50(weights=None)
        self.model.fc = nn.Linear(self.model.fc.in_features, embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [B, embed_dim] from pixels [B, 1 or 3, H, W]."""
        return self.model(_as_three_channels(pixels))


class SwinVision(nn.Module):
    """HF ``SwinModel`` (pooled output) then ``projection_head`` Linear(no bias)."""

    def __init__(self, embed_dim: int, tiny: bool = False) -> None:
        super().__init__()
        from transformers import SwinConfig, SwinModel

        # The default SwinConfig is swin-tiny-patch4-window7-224, the authors' "ViT" tower.
        config = SwinConfig(**TINY_SWIN) if tiny else SwinConfig()
        self.model = SwinModel(config, add_pooling_layer=True)
        self.projection_head = nn.Linear(config.hidden_size, embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [B, embed_dim] from pixels [B, 1 or 3, H, W]."""
        pooled = self.model(pixel_values=_as_three_channels(pixels)).pooler_output
        return self.projection_head(pooled)


class ClinicalBertText(nn.Module):
    """``BertModel`` (with pooler, as in the checkpoint) and ``projection_head``; MedCLIP's pooling rule."""

    def __init__(self, bert_fields: dict, embed_dim: int) -> None:
        super().__init__()
        from transformers import BertModel

        config = bert.bert_config(bert_fields, output_hidden_states=True)
        self.model = BertModel(config, add_pooling_layer=True)
        self.projection_head = nn.Linear(config.hidden_size, embed_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised text embeddings [P, embed_dim].

        Hidden states 1, 2 and -1 (the first two layers and the last), each averaged over ALL positions,
        padding included (the authors pass no mask to the mean: tokenising prompts together changes their
        embeddings), then averaged over the three layers and projected.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states
        layers = torch.stack([hidden[1], hidden[2], hidden[-1]])  # [3, P, L, H]
        pooled = layers.mean(dim=2).mean(dim=0)  # positions, then layers
        return self.projection_head(pooled)


# ---------------------------------------------------------------------------------------------------------------
# The model


class MedCLIP(VisionLanguageModel):
    """MedCLIP with the authors' module names; ``variant`` is "resnet" or "swin"."""

    def __init__(self, spec: ModelSpec, tokenizer) -> None:
        super().__init__()
        if spec.config in _RESNET_CONFIGS:
            self.variant = "resnet"
            self.vision_model: nn.Module = ResNetVision(spec.embed_dim, tiny=_RESNET_CONFIGS[spec.config])
        elif spec.config in _SWIN_CONFIGS:
            self.variant = "swin"
            self.vision_model = SwinVision(spec.embed_dim, tiny=_SWIN_CONFIGS[spec.config])
        else:
            known = ", ".join([*_RESNET_CONFIGS, *_SWIN_CONFIGS])
            raise ValueError(f"model '{spec.name}': unknown MedCLIP config '{spec.config}' (known: {known})")
        bert_fields = bert.TINY_BERT if spec.tiny else bert.CLINICAL_BERT
        self.text_model = ClinicalBertText(bert_fields, spec.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.embed_dim = spec.embed_dim
        self.spec_name = spec.name
        self._tokenizer = tokenizer

    def image_transforms(self) -> dict[str, MedCLIPStudyTransform | MedCLIPTransform]:
        """``study`` (the default, to reproduce the study): shortest side 224 bilinear, centre crop; ``upstream``
        (MedCLIP's README feature extractor): pad to square, 224 bicubic. One normalised channel both."""
        return {"study": MedCLIPStudyTransform(), UPSTREAM: MedCLIPTransform()}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Lower-cased WordPiece ids, padded to the longest prompt of ``texts`` (padding counts in the mean)."""
        encoded = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt"
        )
        return {key: value for key, value in encoded.items()}

    def _param_like(self) -> torch.Tensor:
        return self.text_model.projection_head.weight

    def convolutional(self) -> bool:
        return isinstance(self.vision_model, ResNetVision)

    def encode_image_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings [B, embed_dim] from [B, 1 or 3, 224, 224], before L2 normalisation."""
        ref = self._param_like()
        return self.vision_model(pixels.to(device=ref.device, dtype=ref.dtype))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised text embeddings [P, embed_dim] from :meth:`tokenize` output."""
        device = self._param_like().device
        mask = tokens.get("attention_mask")
        embeds = self.text_model(tokens["input_ids"].to(device), None if mask is None else mask.to(device))
        return F.normalize(embeds, dim=-1)

    def zeroshot_logit_scale(self) -> float:
        """exp(logit_scale) after the authors' clamp of logit_scale to [0, 4.6052]: at most 100.00296."""
        return math.exp(min(max(float(self.logit_scale.detach()), 0.0), LOGIT_SCALE_MAX))

    def image_tower(self) -> nn.Module:
        """``vision_model``: the backbone plus its projection (ResNet ``fc`` / Swin ``projection_head``)."""
        return self.vision_model

    def lora_layout(self) -> TowerLayout:
        """The ResNet's bottleneck convolutions, or every Swin block's attention (and, embedkit's, MLP) projections."""
        if self.variant == "resnet":
            return RESNET_LAYOUT
        names = dict(self.vision_model.named_modules())
        block = next(n for n in names if re.fullmatch(_SWIN_BLOCK, n))
        return SWIN_LAYOUT if f"{block}.attention.q_proj" in names else SWIN_V4_LAYOUT


def _vocab_size(fields_tiny: bool) -> int:
    return (bert.TINY_BERT if fields_tiny else bert.CLINICAL_BERT)["vocab_size"]


def build(spec: ModelSpec, seed: int = 0) -> MedCLIP:
    """The real architecture with random weights, deterministic for ``seed``, and a synthetic tokenizer.

    The global torch RNG is left as it was. Works under ``with torch.device("meta"):`` (shapes only).
    """
    tokenizer = bert.synthetic_tokenizer(_vocab_size(spec.tiny))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MedCLIP(spec, tokenizer)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Released weights

# Checkpoints saved under transformers 4 name Swin's attention and MLP modules differently from transformers 5
# (which renames them itself in from_pretrained, but not in load_state_dict). Old name -> current name.
_LEGACY_SWIN_RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"(\.blocks\.\d+\.attention\.)self\.query\.", r"\1q_proj."),
        (r"(\.blocks\.\d+\.attention\.)self\.key\.", r"\1k_proj."),
        (r"(\.blocks\.\d+\.attention\.)self\.value\.", r"\1v_proj."),
        (r"(\.blocks\.\d+\.attention\.)self\.(relative_position_\w+)$", r"\1relative_position_bias.\2"),
        (r"(\.blocks\.\d+\.attention\.)output\.dense\.", r"\1o_proj."),
        (r"(\.blocks\.\d+\.)intermediate\.dense\.", r"\1mlp.fc1."),
        (r"(\.blocks\.\d+\.)output\.dense\.", r"\1mlp.fc2."),
    )
)


def _current_swin_name(key: str) -> str:
    if not key.startswith("vision_model.model.encoder.layers."):
        return key
    for pattern, repl in _LEGACY_SWIN_RENAMES:
        renamed, hits = pattern.subn(repl, key)
        if hits:
            return renamed
    return key


def _is_derived_buffer(key: str) -> bool:
    # Buffers computed from the config, not learned: old checkpoints carry them, current transformers does not.
    return key.endswith("embeddings.position_ids") or key.endswith("relative_position_index")


def clean_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The authors' state dict with keys made to match ``model``; anything else that differs raises.

    Drops ``*.embeddings.position_ids`` and Swin ``*.relative_position_index`` (derived buffers that current
    transformers no longer stores), renames transformers-4 Swin keys where the model uses the new names, and
    raises :class:`CheckpointError` naming every other missing or unexpected key or shape mismatch.
    """
    expected = model.state_dict()
    cleaned: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key not in expected:
            renamed = _current_swin_name(key)
            key = renamed if renamed in expected else key
        if _is_derived_buffer(key) and key not in expected:
            continue
        cleaned[key] = tensor
    for key in expected:
        if key not in cleaned and _is_derived_buffer(key):
            cleaned[key] = expected[key]  # an older transformers keeps it persistent: use the model's own value

    hint = ""
    variant = getattr(model, "variant", None)
    has_swin_head = "vision_model.projection_head.weight" in state
    if variant == "resnet" and has_swin_head:
        hint = " It looks like the Swin checkpoint (medclip-vit-pretrained.zip): use model medclip-vit."
    elif variant == "swin" and not has_swin_head and "vision_model.model.fc.weight" in state:
        hint = " It looks like the ResNet checkpoint (medclip-pretrained.zip): use model medclip-rn50."
    problems = key_mismatches(model, cleaned)
    if problems:
        raise CheckpointError(
            f"{source} does not match MedCLIP '{getattr(model, 'spec_name', '?')}': " + "; ".join(problems) + "."
            + hint
        )
    return cleaned


def load(spec: ModelSpec, path: str | Path) -> MedCLIP:
    """MedCLIP with the authors' weights: ``path`` is the unzipped folder or its ``pytorch_model.bin``.

    Bio_ClinicalBERT's ``vocab.txt`` must sit beside the weights (the release zip lacks it).
    """
    path = Path(path)
    weights = path if path.is_file() else path / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingWeightsError(f"{WEIGHTS_FILE} not found at {weights}. " + spec.missing_message(path))
    tokenizer = bert.clinical_bert_tokenizer(weights, spec.name, _vocab_size(spec.tiny))
    state = read_tensor_file(weights, "the MedCLIP release (unzip it)")
    model = MedCLIP(spec, tokenizer)
    model.load_state_dict(clean_state_dict(state, model, source=str(weights)), strict=True)
    return model.eval()


class MedClipFamily(ModelFamily):
    """MedCLIP's zero-shot: exp(logit_scale) * cosine per prompt, the scale clamped to exp(4.6052) as the authors
    clamp it, then the mean (the authors' ``ensemble=True``) or max (their ``PromptClassifier`` default) over a
    class's CheXpert-style prompts."""

    module = "medclip"
    preprocessings = ("study", UPSTREAM)
    zeroshot_rule = "medclip"
    # chexpert-nih covers NIH's six classes (the default); chexpert-authors is MedCLIP's draw, seeded, to reproduce it.
    prompt_sets = ("chexpert-nih", "chexpert-authors")
    scale_max = math.exp(LOGIT_SCALE_MAX)  # 100.00296: the authors clamp logit_scale to [0, 4.6052]

    def build(self, spec: ModelSpec, seed: int) -> MedCLIP:
        return build(spec, seed)

    def load(self, spec: ModelSpec, path: Path) -> MedCLIP:
        return load(spec, path)

    def logit_scale(self, scale: float, source: str) -> tuple[float, str]:
        if scale > self.scale_max:
            return self.scale_max, source + ", clamped to exp(4.6052) = 100.003 as the MedCLIP authors do"
        return scale, source

    def zeroshot_settings(self, ensemble: str, logit_scale: float, scale_source: str, scored_rows: str) -> dict:
        return {**super().zeroshot_settings(ensemble, logit_scale, scale_source, scored_rows),
                "class_score": f"{ensemble} over the class's prompts of min(logit_scale, exp(4.6052)) * cosine"}


FAMILY = MedClipFamily()
