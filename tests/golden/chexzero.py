"""CheXzero's preprocessing and zero-shot rule, transcribed from rajpurkarlab/CheXzero for the golden tests.

What is carried over (no embedkit imports):

- ``data_process.img_to_hdf5`` + ``preprocess(img, desired_size=320)``: each file is read with
  ``cv2.imread`` (3 channels, BGR) and ``cv2.cvtColor(BGR2RGB)``, made a PIL image, resized so that its longer
  side is 320 (``ratio = 320 / max(size)``, each side ``int(side * ratio)``) with ``Image.ANTIALIAS`` (Lanczos),
  and pasted at ((320 - w) // 2, (320 - h) // 2) on a black 320 x 320 ``'L'`` image (PIL converts the RGB
  image to L as it pastes). The HDF5 dataset has h5py's default dtype, float32.
- ``zero_shot.CXRTestDataset`` + ``make(pretrained=True)``: the 320 x 320 array repeated on three channels,
  ``Normalize((101.48761,) * 3, (83.43944,) * 3)``, then ``Resize(224, InterpolationMode.BICUBIC)`` of the
  tensor. torchvision 0.11.3 (their requirements.txt) resized tensors with ``interpolate(mode="bicubic",
  align_corners=False)``, no antialias. Batches of one (``DataLoader`` defaults).
- Their model is OpenAI's CLIP ViT-B/32 (``clip.load("ViT-B/32", jit=False)`` then ``load_state_dict`` of their
  checkpoint): :mod:`golden.openai_clip`.
- ``zero_shot.run_softmax_eval`` with ``cxr_pair_template = ("{}", "no {}")``: ``zeroshot_classifier`` per
  template (one template: each class's one text embedding, normalised, averaged, renormalised), ``predict``
  (unit image features @ those weights: plain cosines, no logit scale), then per class
  exp(pos) / (exp(pos) + exp(neg)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from golden import openai_clip

DESIRED_SIZE = 320
MEAN = 101.48761
STD = 83.43944
PAIR_TEMPLATE = ("{}", "no {}")


def read_rgb(path) -> Image.Image:
    """``img_to_hdf5``'s read: cv2 (three channels whatever the file holds), BGR to RGB, a PIL image."""
    import cv2

    return Image.fromarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))


def preprocess(img: Image.Image, desired_size: int = DESIRED_SIZE) -> Image.Image:
    """``data_process.preprocess``: longer side to 320 (Lanczos), pasted centred on a black L square."""
    old_size = img.size
    ratio = float(desired_size) / max(old_size)
    new_size = tuple(int(x * ratio) for x in old_size)
    img = img.resize(new_size, Image.Resampling.LANCZOS)  # Image.ANTIALIAS, removed in Pillow 10, was LANCZOS
    new_img = Image.new("L", (desired_size, desired_size))
    new_img.paste(img, ((desired_size - new_size[0]) // 2, (desired_size - new_size[1]) // 2))
    return new_img


def stored(img: Image.Image) -> np.ndarray:
    """What ``img_dset[idx] = preprocess(img)`` leaves in the float32 HDF5 dataset: [320, 320]."""
    return np.asarray(preprocess(img)).astype(np.float32)


def eval_transform(stored_image: np.ndarray, input_resolution: int = 224) -> torch.Tensor:
    """``CXRTestDataset.__getitem__`` then Normalize and torchvision 0.11's tensor Resize: [3, 224, 224]."""
    img = torch.from_numpy(np.repeat(np.expand_dims(stored_image, axis=0), 3, axis=0))
    img = (img - torch.tensor([MEAN] * 3)[:, None, None]) / torch.tensor([STD] * 3)[:, None, None]
    return F.interpolate(img[None], size=[input_resolution, input_resolution], mode="bicubic",
                         align_corners=False)[0]



@torch.no_grad()
def zeroshot_classifier(classnames: list[str], template: str, model: openai_clip.CLIP) -> torch.Tensor:
    """``zero_shot.zeroshot_classifier(classnames, [template], model)``: [embed_dim, classes]."""
    return openai_clip.zeroshot_classifier(model, [[template.format(c)] for c in classnames])


@torch.no_grad()
def predict(images: torch.Tensor, model: openai_clip.CLIP, zeroshot_weights: torch.Tensor) -> np.ndarray:
    """``zero_shot.predict`` (softmax_eval=True): per image, unit image features @ weights: [N, classes]."""
    rows = []
    for image in images:  # their DataLoader's batches of one
        features = model.encode_image(image[None])
        features = features / features.norm(dim=-1, keepdim=True)
        rows.append(np.squeeze((features @ zeroshot_weights).numpy(), axis=0))
    return np.array(rows)


def run_softmax_eval(model: openai_clip.CLIP, images: torch.Tensor, eval_labels: list[str],
                     pair_template: tuple[str, str] = PAIR_TEMPLATE) -> np.ndarray:
    """The probability that each label is present: [N, labels]."""
    pos_pred = predict(images, model, zeroshot_classifier(eval_labels, pair_template[0], model))
    neg_pred = predict(images, model, zeroshot_classifier(eval_labels, pair_template[1], model))
    sum_pred = np.exp(pos_pred) + np.exp(neg_pred)
    return np.exp(pos_pred) / sum_pred
