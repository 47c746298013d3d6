"""OpenAI CLIP ViT-B/16 and BiomedCLIP through open_clip: offline random builds and the authors' released files.

Architectures are data: ``configs/openclip/<spec.config>.json`` (open_clip's ``open_clip_config.json`` layout)
or, for ``ViT-B-16-quickgelu``, open_clip's own built-in config. One code path serves every model here:
config -> local text tower -> open_clip ``CLIP`` / ``CustomTextCLIP`` -> (optionally) strict weight loading.
We construct the open_clip model classes directly instead of going through ``open_clip.create_model``, so that
nothing can reach the hub (its ``pretrained_text`` default downloads BERT) and key clean-up stays in our hands.

Weights (``load``):
- ``clip``: a file ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` / OpenAI's ``ViT-B-16.pt``,
  or a folder holding one. Besides open_clip's files: an OpenAI-style state dict (same key names; its integer
  entries ``input_resolution``, ``context_length``, ``vocab_size`` are dropped) and OpenAI's TorchScript archive
  (what ``clip.load`` downloads), whose tensors are read without running it (``base.read_torchscript_tensors``).
- ``biomedclip``: a folder in open_clip's ``local-dir:`` layout (``open_clip_config.json``,
  ``open_clip_pytorch_model.bin``, ``vocab.txt``, ``tokenizer_config.json``).
- Either may also be a filled Hugging Face hub cache (the cache root, the ``models--org--name`` folder or one
  of its snapshots); it is read as a plain folder, so nothing is fetched.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from embedkit.models import bert
from embedkit.models.base import (UPSTREAM, CheckpointError, ModelFamily, Preprocessing, TowerLayout,
                                  VisionLanguageModel, load_strict, read_tensor_file)
from embedkit.models.registry import MissingWeightsError, ModelSpec

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ClipImageTransform",
    "OpenClipModel",
    "CheckpointError",
    "FAMILY",
    "build",
    "clip_tokenizer",
    "create_clip",
    "drop_openai_jit_keys",
    "load",
    "model_config",
]

CONFIG_DIR = Path(__file__).parent / "configs" / "openclip"

# OpenAI CLIP's normalisation; BiomedCLIP's open_clip_config.json repeats it.
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# The BERT config folder (package data) that replaces each config's hub name for the text tower.
_BERT_FOLDERS: dict[str, str] = {"biomedclip": "biomedbert", "tiny-biomedclip": "tiny-bert"}

# Checkpoint file names open_clip releases use, preferred first.
CHECKPOINT_FILES: tuple[str, ...] = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# OpenAI's own file name for an architecture (``clip.load`` caches it under ~/.cache/clip/), looked for after those.
_OPENAI_FILES: dict[str, str] = {"ViT-B-16-quickgelu": "ViT-B-16.pt"}

# Integers OpenAI's JIT-era model kept as buffers (clip.build_model reads and deletes them; no module has them).
OPENAI_JIT_KEYS: tuple[str, ...] = ("input_resolution", "context_length", "vocab_size")

# Keys released checkpoints carry that current modules do not have: BERT's unused pooler (BiomedCLIP builds its
# text tower without one) and the old `position_ids` buffer that transformers no longer saves.
_DROPPED_PREFIXES: tuple[str, ...] = ("text.transformer.pooler.",)
_DROPPED_SUFFIXES: tuple[str, ...] = ("position_ids",)

TINY_TIMM_VIT = "embedkit_tiny_vit_patch16_224"

# Where LoRA goes: every residual block of the ViT; the study adapts the attention input projection only, embedkit's
# layout also the output projection and the MLP. open_clip's own ViT (OpenAI CLIP, CheXzero) uses
# nn.MultiheadAttention: ``attn.in_proj`` is its in_proj alone, ``attn`` in_proj and out_proj (see
# embedkit.finetune.lora for why never its out_proj by name); a timm ViT (BiomedCLIP) has Linears.
OPENCLIP_VIT_LAYOUT = TowerLayout("openclip-vit", r"transformer\.resblocks\.\d+", ("attn.in_proj",),
                                  ("attn", "mlp.c_fc", "mlp.c_proj"))
TIMM_VIT_LAYOUT = TowerLayout("timm-vit", r"trunk\.blocks\.\d+", ("attn.qkv",),
                              ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))


# --------------------------------------------------------------------------------------------------------------
# Preprocessing and tokenization


@dataclass(frozen=True)
class ClipImageTransform(Preprocessing):
    """PIL image -> normalised float tensor [3, size, size], as open_clip's eval transform does it.

    Pixels: resize the shortest side to ``size`` (bicubic), center crop, convert to RGB (grayscale is repeated on
    three channels). Tensor: scale to [0, 1], normalise. A frozen dataclass so that DataLoader workers can pickle it.
    """

    size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def pixels(self, image: Image.Image) -> np.ndarray:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # PIL's convert() clips 16-bit values instead of rescaling them: refuse rather than embed a white image.
            raise ValueError(
                f"image mode {image.mode} is not 8-bit; decode files with embedkit.data.images.decode_image, "
                "which rescales 16-bit images to 8-bit"
            )
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, self.size)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        return TF.normalize(TF.to_tensor(pixels), self.mean, self.std)

    def recipe(self) -> str:
        return f"clip: shortest side {self.size} bicubic (torchvision), center crop {self.size}, RGB"


@lru_cache(maxsize=4)
def clip_tokenizer(context_length: int):
    # The BPE vocabulary ships inside open_clip (offline); loading it takes a moment, so share one instance.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class _BertPromptTokenizer:
    """BERT WordPiece tokenization as open_clip's HFTokenizer does it (BiomedCLIP's authors' code): clean the text as
    for CLIP's BPE but keep its case (ftfy.fix_text, HTML entities unescaped twice, whitespace collapsed: its
    ``whitespace_clean(basic_clean(text))``), pad to the context."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        from open_clip.tokenizer import basic_clean, whitespace_clean

        texts = [whitespace_clean(basic_clean(t)) for t in texts]
        return self.tokenizer(
            texts, return_tensors="pt", max_length=self.context_length, padding="max_length", truncation=True
        ).input_ids


# --------------------------------------------------------------------------------------------------------------
# The model


class OpenClipModel(VisionLanguageModel):
    """An open_clip CLIP or CustomTextCLIP (``self.model``, the authors' key names) behind embedkit's interface."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 transform: Callable[[Image.Image], torch.Tensor], embed_dim: int, name: str):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self._transform = transform
        self.embed_dim = embed_dim
        self.name = name

    def _device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_transforms(self) -> dict[str, Callable[[Image.Image], torch.Tensor]]:
        """One, the authors': CLIP's resize 224 bicubic, center crop 224, RGB, OpenAI mean/std (CheXzero: its
        own, :class:`embedkit.models.chexzero.CheXzeroTransform`); picklable."""
        return {UPSTREAM: self._transform}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids": LongTensor [P, context]}``: CLIP BPE (context 77) or BERT WordPiece (context 256)."""
        if isinstance(texts, str):
            texts = [texts]
        return {"input_ids": self._tokenizer(list(texts))}

    def encode_image_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, embed_dim] after the projection, before L2 normalisation."""
        return self.model.encode_image(pixels.to(self._device()), normalize=False)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised text embeddings [P, embed_dim]; the BERT attention mask is ``ids != pad`` inside."""
        return self.model.encode_text(tokens["input_ids"].to(self._device()), normalize=True)

    def zeroshot_logit_scale(self) -> float:
        """exp(logit_scale): 100 for the OpenAI and BiomedCLIP weights, 1/0.07 at random init."""
        return float(self.model.logit_scale.detach().exp())

    def image_tower(self) -> nn.Module:
        """open_clip's ``visual`` module (a VisionTransformer, or a TimmModel with ``trunk`` and ``head``)."""
        return self.model.visual

    def lora_layout(self) -> TowerLayout:
        """Every ViT block: a timm trunk (BiomedCLIP) or open_clip's own transformer (OpenAI CLIP, CheXzero)."""
        return TIMM_VIT_LAYOUT if hasattr(self.model.visual, "trunk") else OPENCLIP_VIT_LAYOUT


# --------------------------------------------------------------------------------------------------------------
# Architectures


def _register_tiny_timm_vit() -> None:
    """Register a tiny timm ViT (width 64, 2 blocks, patch 16, 224 px) for tiny-biomedclip.

    open_clip's TimmModel takes only a timm model *name*, so small widths need a registered name.
    """
    import timm
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(TINY_TIMM_VIT):
        return

    def embedkit_tiny_vit_patch16_224(pretrained: bool = False, pretrained_cfg: dict | None = None, **kwargs):
        if pretrained:
            raise ValueError(f"{TINY_TIMM_VIT} has no pretrained weights")
        # An explicit pretrained_cfg keeps timm from warning that the name has none registered.
        cfg = pretrained_cfg or dict(architecture=TINY_TIMM_VIT, input_size=(3, 224, 224), mean=OPENAI_MEAN,
                                     std=OPENAI_STD, num_classes=0, interpolation="bicubic")
        args = dict(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2)
        return build_model_with_cfg(VisionTransformer, TINY_TIMM_VIT, pretrained=False, pretrained_cfg=cfg,
                                    **{**args, **kwargs})

    register_model(embedkit_tiny_vit_patch16_224)


def model_config(spec: ModelSpec) -> dict:
    """The shipped open_clip config of ``spec`` (``{"model_cfg": ..., "preprocess_cfg": ...}``), a fresh copy."""
    path = CONFIG_DIR / f"{spec.config}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import open_clip

    model_cfg = open_clip.get_model_config(spec.config)  # ViT-B-16-quickgelu: open_clip's built-in config
    if model_cfg is None:
        raise ValueError(f"model '{spec.name}': no open_clip config '{spec.config}' in {CONFIG_DIR} or open_clip")
    return {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": {}}


def _uses_bert(config: dict) -> bool:
    return "hf_model_name" in config["model_cfg"]["text_cfg"]


def _localise_text_tower(spec: ModelSpec, model_cfg: dict) -> dict:
    """Point the BERT text tower at the shipped config folder: no hub lookup, no pretrained BERT download."""
    model_cfg = copy.deepcopy(model_cfg)
    text_cfg = model_cfg["text_cfg"]
    if "hf_model_name" in text_cfg:
        if spec.config not in _BERT_FOLDERS:
            raise ValueError(f"model '{spec.name}': no local BERT config for open_clip config '{spec.config}'")
        folder = str(CONFIG_DIR / _BERT_FOLDERS[spec.config])
        text_cfg["hf_model_name"] = folder
        text_cfg["hf_tokenizer_name"] = folder
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in model_cfg["vision_cfg"]:
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
        if model_cfg["vision_cfg"]["timm_model_name"] == TINY_TIMM_VIT:
            _register_tiny_timm_vit()
    return model_cfg


def create_clip(spec: ModelSpec, config: dict, seed: int) -> nn.Module:
    """Instantiate the open_clip model for ``config`` with random weights drawn from ``seed``, in eval mode.

    Works under ``with torch.device("meta"):`` (no memory, for shape tests).
    """
    from open_clip.model import CLIP, CustomTextCLIP

    model_cfg = _localise_text_tower(spec, config["model_cfg"])
    if model_cfg.get("embed_dim") != spec.embed_dim:
        raise CheckpointError(
            f"model '{spec.name}' has embed_dim {spec.embed_dim}, but its open_clip config says "
            f"{model_cfg.get('embed_dim')}: the config belongs to another model"
        )
    model_class = CustomTextCLIP if "hf_model_name" in model_cfg["text_cfg"] else CLIP
    # Fork the RNG so that building a model never shifts the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(**model_cfg)
    return model.eval()


def _transform_for(config: dict) -> ClipImageTransform:
    pre = config.get("preprocess_cfg") or {}
    size = config["model_cfg"]["vision_cfg"].get("image_size", 224)
    return ClipImageTransform(size=int(size), mean=tuple(pre.get("mean", OPENAI_MEAN)),
                              std=tuple(pre.get("std", OPENAI_STD)))


def _wrap(spec: ModelSpec, model: nn.Module, config: dict, tokenizer: Callable) -> OpenClipModel:
    # Eval mode: BERT's dropout would otherwise make embeddings random; fine-tuning calls .train() itself.
    return OpenClipModel(model, tokenizer, _transform_for(config), spec.embed_dim, spec.name).eval()


def build(spec: ModelSpec, seed: int = 0) -> OpenClipModel:
    """The real architecture of ``spec`` with random weights, deterministic for ``seed``; fully offline.

    BERT-based models get a synthetic WordPiece vocabulary of the real size (the real one comes with the weights).
    """
    config = model_config(spec)
    model = create_clip(spec, config, seed)
    context_length = int(config["model_cfg"]["text_cfg"]["context_length"])
    if _uses_bert(config):
        tokenizer = _BertPromptTokenizer(bert.synthetic_tokenizer(model.text.config.vocab_size), context_length)
    else:
        tokenizer = clip_tokenizer(context_length)
    return _wrap(spec, model, config, tokenizer)


# --------------------------------------------------------------------------------------------------------------
# Released weights


def _missing(spec: ModelSpec, path: Path, what: str) -> MissingWeightsError:
    return MissingWeightsError(f"{what} not found in {path}. " + spec.missing_message(path))


def _resolve_hf_cache(spec: ModelSpec, path: Path) -> Path:
    """Map a Hugging Face hub cache (root, ``models--org--name`` or snapshot) to the folder of files it holds."""
    if not path.is_dir():
        return path
    repo = spec.hf_repo  # the hub repository of the released weights (registry.py)
    if repo and (path / ("models--" + repo.replace("/", "--"))).is_dir():
        path = path / ("models--" + repo.replace("/", "--"))
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise _missing(spec, path, "no snapshot of the Hugging Face cache")
    return found[-1]  # newest download


def _find_checkpoint(spec: ModelSpec, path: Path, names: tuple[str, ...] = CHECKPOINT_FILES) -> Path:
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise _missing(spec, path, " or ".join(names))


def _checkpoint_state(spec: ModelSpec, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (open_clip training checkpoints wrap them in "state_dict"), keys cleaned."""
    return _clean_keys(read_tensor_file(checkpoint, f"the {spec.name} weights ({spec.weight_source})", unwrap=True))


def drop_openai_jit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without OpenAI's JIT-era integers (:data:`OPENAI_JIT_KEYS`), as ``clip.build_model`` drops them.

    Only 0-dim integer tensors go: anything else under those names is left for the strict load to name.
    """
    return {k: v for k, v in state.items()
            if not (k in OPENAI_JIT_KEYS and v.ndim == 0 and not v.is_floating_point())}


def _clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the keys released checkpoints carry that current modules lack (see _DROPPED_*)."""
    return {k: v for k, v in state.items()
            if not k.startswith(_DROPPED_PREFIXES) and not k.endswith(_DROPPED_SUFFIXES)}


def _load_strict(spec: ModelSpec, model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    load_strict(model, state, f"{source} (model '{spec.name}', {spec.config})",
                hint=f" Is it the right file? Released weights: {spec.weight_source}")


def _load_bert_folder(spec: ModelSpec, folder: Path) -> OpenClipModel:
    """BiomedCLIP-style folder: architecture from open_clip_config.json, BERT tokenizer from vocab.txt."""
    if not folder.is_dir():
        raise _missing(spec, folder, "a folder (open_clip local-dir layout; a file was given)")
    for name in ("open_clip_config.json", "vocab.txt", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise _missing(spec, folder, name)
    checkpoint = _find_checkpoint(spec, folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    if "model_cfg" not in config:
        raise CheckpointError(f"{folder / 'open_clip_config.json'} has no 'model_cfg'")
    if not _uses_bert(config):
        raise CheckpointError(f"{folder / 'open_clip_config.json'}: text tower is not a BERT (no hf_model_name)")
    model = create_clip(spec, config, seed=0)
    _load_strict(spec, model, _checkpoint_state(spec, checkpoint), checkpoint)

    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    # bert.load_tokenizer reads vocab.txt with `vocab=` (transformers 5 ignores `vocab_file=`: all [UNK]).
    tokenizer = bert.load_tokenizer(folder / "vocab.txt", do_lower_case=bool(tok_cfg.get("do_lower_case", True)))
    # Fewer tokens than embedding rows is harmless (some vocabularies are padded); more would index past the table.
    if len(tokenizer) > model.text.config.vocab_size:
        raise CheckpointError(
            f"{folder / 'vocab.txt'} has {len(tokenizer)} tokens but the text tower only "
            f"{model.text.config.vocab_size}: vocab.txt and the weights are from different models"
        )
    context_length = int(config["model_cfg"]["text_cfg"]["context_length"])
    return _wrap(spec, model, config, _BertPromptTokenizer(tokenizer, context_length))


def load(spec: ModelSpec, path: str | Path) -> OpenClipModel:
    """The authors' released weights from ``path`` (see the module docstring for layouts), loaded strictly."""
    path = _resolve_hf_cache(spec, Path(path))
    if not path.exists():
        raise _missing(spec, path, "the weights path")
    config = model_config(spec)
    if _uses_bert(config):
        return _load_bert_folder(spec, path)
    openai_file = _OPENAI_FILES.get(spec.config.removeprefix("tiny-"))  # the tiny twin reads the same layouts
    checkpoint = _find_checkpoint(spec, path, CHECKPOINT_FILES + ((openai_file,) if openai_file else ()))
    model = create_clip(spec, config, seed=0)
    _load_strict(spec, model, drop_openai_jit_keys(_checkpoint_state(spec, checkpoint)), checkpoint)
    tokenizer = clip_tokenizer(int(config["model_cfg"]["text_cfg"]["context_length"]))
    return _wrap(spec, model, config, tokenizer)


class OpenClipFamily(ModelFamily):
    """OpenAI CLIP and BiomedCLIP: zero-shot as open_clip and CLIP's paper build a classifier from templates.

    ``ensemble="embedding"`` (the default): a class's prompt embeddings (each unit-norm) are averaged and the
    mean renormalised; the class score is logit_scale * cosine with it. ``"mean"`` / ``"max"``: the mean or max of
    the per-prompt logits instead (``scaled_cosine``). With one prompt per class (``biomedclip-authors``, the
    template BiomedCLIP's authors score with) all three agree.
    """

    module = "openclip"
    prompt_sets = ("clip", "biomedclip-authors")
    ensembles = ("embedding", "mean", "max")

    def build(self, spec: ModelSpec, seed: int) -> OpenClipModel:
        return build(spec, seed)

    def load(self, spec: ModelSpec, path: Path) -> OpenClipModel:
        return load(spec, path)

    def class_scores(self, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray, n_classes: int,
                     logit_scale: float, ensemble: str, local_sim: np.ndarray | None = None) -> np.ndarray:
        if ensemble != "embedding":
            return super().class_scores(image, prompts, prompt_class, n_classes, logit_scale, ensemble)
        means = np.stack([prompts[prompt_class == c].mean(axis=0) for c in range(n_classes)])
        return logit_scale * (image @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T)

    def zeroshot_settings(self, ensemble: str, logit_scale: float, scale_source: str, scored_rows: str) -> dict:
        settings = super().zeroshot_settings(ensemble, logit_scale, scale_source, scored_rows)
        if ensemble == "embedding":
            settings["class_score"] = ("logit_scale * cosine with the class's mean prompt embedding, renormalised "
                                       "(open_clip's zero-shot classifier)")
        return settings


FAMILY = OpenClipFamily()
