"""CheXzero (Tiu et al., Nature Biomedical Engineering 2022): OpenAI CLIP ViT-B/32 trained further on MIMIC-CXR
chest X-rays paired with the impression sections of their reports.

- Architecture: OpenAI CLIP ViT-B/32 exactly (open_clip ``ViT-B-32-quickgelu``: embedding 512, 224 px, patch 32,
  12 vision layers of width 768; text context 77, BPE vocabulary 49408, width 512, 12 layers), so the authors'
  checkpoint loads 1:1 into open_clip's ``CLIP`` (the key names are OpenAI's).
- Weights: the authors' checkpoints (``best_64_5e-05_original_22000_0.864.pt``, the best of their ten) are plain
  state dicts saved with ``torch.save(model.state_dict())``; read with ``weights_only=True``. OpenAI's JIT-era
  keys ``input_resolution``, ``context_length`` and ``vocab_size`` are dropped if present
  (``openclip.drop_openai_jit_keys``); any other difference is an error.
- Preprocessing: the authors store every image as 320 x 320 grayscale (read as RGB, longest side resized to 320
  with Lanczos, sizes floored, pasted centred on black, which converts it to L), then at test time repeat it on
  three channels, normalise the 0-255 values with mean 101.48761 and std 83.43944, and resize the normalised
  tensor to 224 (bicubic, no antialias, as torchvision's tensor Resize did when they ran it).
- Zero-shot: one (positive, negative) prompt pair per class, ``"{class}"`` and ``"no {class}"``; the probability
  that the class is present is the softmax over the pair of the plain cosines (no logit scale). embedkit scores a
  class by that softmax's log-odds, cos(image, positive) - cos(image, negative), and the run's probabilities
  are the softmax over classes of those scores, as for every rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from embedkit.models import openclip
from embedkit.models.base import ModelFamily, Preprocessing, gray_pixels, load_strict, read_tensor_file
from embedkit.models.registry import MissingWeightsError, ModelSpec

STORED_SIZE = 320  # the authors' HDF5 images: longest side resized to this, zero-padded square
PIXEL_MEAN = 101.48761  # on 0-255 values, every channel (the authors' cxr_stats)
PIXEL_STD = 83.43944
PAIR_SET = "chexzero-pairs"
NEGATION = "no {}"


@dataclass(frozen=True)
class CheXzeroTransform(Preprocessing):
    """PIL image -> [3, size, size]: the authors' 320 px grayscale square (the pixels), normalised, then resized
    bicubic in float (the tensor stage). Picklable."""

    size: int = 224

    def pixels(self, image: Image.Image) -> np.ndarray:
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            raise ValueError(f"image mode {image.mode} is not 8-bit; decode files with "
                             "embedkit.data.images.decode_image, which rescales 16-bit images to 8-bit")
        # The authors read every file with cv2.imread (three channels), resize that RGB image and let PIL convert it
        # to L as it is pasted (data_process.py): converting first differs by a few gray levels on colour images.
        rgb = image.convert("RGB")
        ratio = STORED_SIZE / max(rgb.size)
        resized = rgb.resize(tuple(int(side * ratio) for side in rgb.size), Image.Resampling.LANCZOS)
        square = Image.new("L", (STORED_SIZE, STORED_SIZE))
        square.paste(resized, ((STORED_SIZE - resized.width) // 2, (STORED_SIZE - resized.height) // 2))
        return gray_pixels(square)

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        square = torch.from_numpy(np.ascontiguousarray(pixels[:, :, 0], dtype=np.float32))
        square = ((square - PIXEL_MEAN) / PIXEL_STD).expand(1, 3, STORED_SIZE, STORED_SIZE)
        return F.interpolate(square, size=(self.size, self.size), mode="bicubic", align_corners=False,
                             antialias=False)[0]

    def recipe(self) -> str:
        return (f"chexzero: RGB, longest side {STORED_SIZE} lanczos (PIL), pasted as grayscale centred on a black "
                f"{STORED_SIZE} square")


def _wrap(spec: ModelSpec, model: torch.nn.Module, config: dict) -> openclip.OpenClipModel:
    size = int(config["model_cfg"]["vision_cfg"]["image_size"])
    tokenizer = openclip.clip_tokenizer(int(config["model_cfg"]["text_cfg"]["context_length"]))
    return openclip.OpenClipModel(model, tokenizer, CheXzeroTransform(size), spec.embed_dim, spec.name).eval()


def build(spec: ModelSpec, seed: int = 0) -> openclip.OpenClipModel:
    """OpenAI CLIP ViT-B/32 (or its tiny twin) with random weights, deterministic for ``seed``; offline."""
    config = openclip.model_config(spec)
    return _wrap(spec, openclip.create_clip(spec, config, seed), config)


def _checkpoint_file(spec: ModelSpec, path: Path) -> Path:
    if path.is_file():
        return path
    named = path / spec.weight_files[0]
    if named.is_file():
        return named
    found = sorted(path.glob("*.pt"))
    if len(found) == 1:
        return found[0]
    what = f"several .pt files ({', '.join(f.name for f in found)}): pass one with --weights" if found \
        else f"{spec.weight_files[0]} not found"
    raise MissingWeightsError(f"{path}: {what}. " + spec.missing_message(path))


def load(spec: ModelSpec, path: str | Path) -> openclip.OpenClipModel:
    """The authors' checkpoint (the ``.pt`` file, or a folder holding it), loaded strictly into ViT-B/32."""
    checkpoint = _checkpoint_file(spec, Path(path))
    state = read_tensor_file(checkpoint, f"the {spec.name} checkpoint ({spec.weight_source})", unwrap=True)
    state = openclip.drop_openai_jit_keys(state)
    config = openclip.model_config(spec)
    model = openclip.create_clip(spec, config, seed=0)
    load_strict(model, state, f"{checkpoint} (model '{spec.name}', OpenAI CLIP {spec.config})",
                hint=f" Is it a CheXzero checkpoint? Released weights: {spec.weight_source}")
    return _wrap(spec, model, config)


class CheXzeroFamily(ModelFamily):
    """CheXzero's zero-shot: per class, the softmax over its (positive, negative) prompt pair of plain cosines."""

    module = "chexzero"
    zeroshot_rule = "chexzero"
    prompt_sets = (PAIR_SET,)
    default_logit_scale = 1.0  # not used: the authors compare raw cosines
    ensembles = ("pair",)
    multilabel_prompt_sets = (PAIR_SET,)  # the authors' multi-label rule is this rule, label by label

    def build(self, spec: ModelSpec, seed: int) -> openclip.OpenClipModel:
        return build(spec, seed)

    def load(self, spec: ModelSpec, path: Path) -> openclip.OpenClipModel:
        return load(spec, path)

    def prompts(self, name: str, classes: tuple[str, ...]) -> tuple[str, dict[str, list[str]]]:
        """``chexzero-pairs``: ["{class}", "no {class}"] per class (positive first); other sets as every family."""
        if name != PAIR_SET:
            return super().prompts(name, classes)
        names = {c: class_phrase(c) for c in classes}
        return PAIR_SET, {c: [names[c], NEGATION.format(names[c])] for c in classes}

    def check_prompts(self, prompt_set: str, prompts_per_class: dict[str, int]) -> None:
        odd = {c: n for c, n in prompts_per_class.items() if n != 2}
        if odd:
            raise ValueError(f"the chexzero rule needs one (positive, negative) prompt pair per class, positive "
                             f"first; prompts per class here: {odd}. Use --prompt-set {PAIR_SET}")

    def class_scores(self, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray, n_classes: int,
                     logit_scale: float, ensemble: str, local_sim: np.ndarray | None = None) -> np.ndarray:
        cosine = image @ prompts.T
        pairs = [np.flatnonzero(prompt_class == c) for c in range(n_classes)]
        return np.stack([cosine[:, pos] - cosine[:, neg] for pos, neg in pairs], axis=1)

    def label_probabilities(self, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray, n_labels: int,
                            logit_scale: float, ensemble: str, local_sim: np.ndarray | None = None) -> np.ndarray:
        """The authors' multi-label probabilities: per label, the softmax over its pair of plain cosines."""
        from embedkit.models.base import _pair_softmax

        return _pair_softmax(self.class_scores(image, prompts, prompt_class, n_labels, logit_scale, ensemble))

    def zeroshot_settings(self, ensemble: str, logit_scale: float, scale_source: str, scored_rows: str) -> dict:
        return {"ensemble": "pair",
                "class_score": "cos(image, positive) - cos(image, negative): the log-odds of the authors' softmax "
                               "over the class's (positive, negative) pair",
                "logit_scale": None, "logit_scale_source": "not used: the authors compare plain cosines"}


def class_phrase(cls: str) -> str:
    """A class as the authors wrote it in prompts: NIH's "Effusion" is CheXpert's "Pleural Effusion"."""
    return {"Effusion": "Pleural Effusion"}.get(cls, cls)


FAMILY = CheXzeroFamily()
