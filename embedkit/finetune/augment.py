"""The paper's training augmentations, on the model's 8-bit pixels after its resize and crop.

Flips (horizontal and vertical, each with probability 0.3), a rotation by an angle drawn uniformly from
[-15, 15] degrees (bilinear, black fill), then brightness and contrast factors drawn from [0.8, 1.2] (jitter 0.2,
torchvision's ColorJitter convention; fixed order: brightness, then contrast). As in the study's pipeline they
come after the geometric part of the model's preprocessing (``Preprocessing.pixels``: resize, pad, crop) and before
its tensor stage (scaling, normalisation), on the uint8 ``[H, W, C]`` pixels; so one implementation serves every
family, and an epoch read from the pixel cache (embedkit/data/pixels.py) is exactly the epoch decoded from PNGs.

Every random draw comes from a generator seeded by (seed, epoch, position of the image in the training list), so
an epoch's augmentations do not depend on which DataLoader worker decodes which image, and a resumed run repeats
them exactly. Validation, test and prediction images are never augmented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from embedkit.data.images import decode_image
from embedkit.embed import ImageFiles

# Where the augmentations act, as checkpoints record it: a run started with another order is not resumed.
AUGMENT_WHERE = "the model's 8-bit pixels after its resize and crop, before tensor conversion and normalisation"
# What runs started before the pixel cache did (their checkpoints have no record).
AUGMENT_WHERE_BEFORE = "decoded 8-bit image, before the model's preprocessing"

# Stream tags: one seed gives independent streams for shuffling, augmentation and torch's own RNG.
SHUFFLE_STREAM, AUGMENT_STREAM, TORCH_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Augment:
    """The paper's augmentations (defaults); a frozen dataclass so DataLoader workers can pickle it."""

    hflip: float = 0.3
    vflip: float = 0.3
    degrees: float = 15.0
    brightness: float = 0.2
    contrast: float = 0.2

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Return the augmented image; every draw is made (in a fixed order) whether or not it is applied."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        # Draw all numbers first, in one order, so the stream never depends on earlier outcomes.
        u_h, u_v = rng.random(2)
        angle = float(rng.uniform(-self.degrees, self.degrees))
        b = float(rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness))
        c = float(rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast))
        if u_h < self.hflip:
            image = TF.hflip(image)
        if u_v < self.vflip:
            image = TF.vflip(image)
        if self.degrees:
            image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
        if self.brightness:
            image = TF.adjust_brightness(image, b)
        if self.contrast:
            image = TF.adjust_contrast(image, c)
        return image

    def pixels(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """:meth:`__call__` on uint8 ``[H, W, C]`` pixels (C = 1: grayscale, C = 3: RGB); same shape back."""
        gray = pixels.shape[2] == 1
        image = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if gray else pixels), "L" if gray else "RGB")
        out = np.asarray(self(image, rng), dtype=np.uint8)
        return out[:, :, None].copy() if gray else out.copy()


def stream(seed: int, tag: int, *keys: int) -> np.random.Generator:
    """A generator for (seed, stream tag, keys...): independent of every other combination."""
    return np.random.default_rng([int(seed), int(tag), *(int(k) for k in keys)])


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The shuffled order of ``n`` training images in ``epoch`` (the same for the same seed and epoch)."""
    return stream(seed, SHUFFLE_STREAM, epoch).permutation(n).tolist()


def torch_seed(seed: int, epoch: int) -> int:
    """The seed torch's global RNG gets at the start of ``epoch`` (dropout, stochastic depth)."""
    return int(stream(seed, TORCH_STREAM, epoch).integers(0, 2**62))


class AugmentedImageFiles(ImageFiles):
    """:class:`embedkit.embed.ImageFiles` keyed by (image, epoch, sample): augmented in the DataLoader workers.

    Items are requested with a key ``(path_index, epoch, sample)`` (see :class:`KeySampler`); ``epoch`` < 0 means
    no augmentation (validation, prediction). ``sample`` (the position in the epoch's list) seeds the image's
    augmentation with ``epoch``, so repeated rows of one image get different draws, and it is what comes back
    with the tensor. The epoch travels inside the key, so workers can persist across epochs. ``source``: the
    pixel cache's entry for ``transform`` (its pixels instead of decoding the file), or None.
    """

    def __init__(self, paths: list[str], transform, augment: Augment | None, seed: int, source=None):
        super().__init__(paths, transform)
        self.augment = augment
        self.seed = seed
        self.source = source

    def __getitem__(self, key: tuple[int, int, int]):
        path_index, epoch, sample = key
        path = self.paths[path_index]
        pixels = self.source.pixels(path) if self.source is not None else self.transform.pixels(decode_image(path))
        if self.augment is not None and epoch >= 0:
            pixels = self.augment.pixels(pixels, stream(self.seed, AUGMENT_STREAM, epoch, sample))
        return sample, self.transform.tensor(pixels)


class KeySampler:
    """A sampler whose keys are set before each pass: one DataLoader (and its workers) serves every pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int]] = []

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)
