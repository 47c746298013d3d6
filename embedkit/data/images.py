"""Image decoding in one place: 8- and 16-bit PNG, JPEG, grayscale and RGB, always to 8-bit 'L' or 'RGB'.

16-bit images are rescaled to the full 8-bit range (PIL's own conversion clips I;16 values instead).
An EXIF Orientation tag is applied (radiology exports carry them): the pixels are those a viewer shows.
A file that is missing or does not decode raises :class:`ImageDecodeError`; no blank image is ever substituted.
So does one whose header promises more than MAX_PIXELS pixels, or a side more than MAX_ASPECT times the other:
a decompression bomb (a 1 MB PNG of 30000 x 30000) or a strip (1 x 40000, which a resize to 224 on the short side
turns into gigabytes) is refused from its header, before a byte of pixels is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embedkit.errors import EmbedkitError


class ImageDecodeError(EmbedkitError, ValueError):
    """An image file is missing, truncated or not an image."""


# Radiographs are a few megapixels (NIH 1024 x 1024; CheXpert and MIMIC-CXR up to ~3000 x 3500) and roughly square.
MAX_PIXELS = 64_000_000
MAX_ASPECT = 8.0


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    # Min-max over the image: a 12-bit scan stored in 16 bits uses the full 8-bit range afterwards.
    array = array.astype(np.float64)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def decode_image(path: str | Path) -> Image.Image:
    """Decode ``path`` to an 8-bit PIL image in mode 'L' (grayscale) or 'RGB'."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageDecodeError(f"image {path} is {width} x {height} pixels, over the limit of "
                                       f"{MAX_PIXELS / 1e6:.0f} megapixels for a radiograph (a decompression bomb?)")
            if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
                raise ImageDecodeError(f"image {path} is {width} x {height} pixels: one side is more than "
                                       f"{MAX_ASPECT:g} times the other, not a radiograph's shape")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # rotates/flips the pixels and drops the tag
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return Image.fromarray(_rescale_to_uint8(np.asarray(img)), mode="L")
            if mode in ("L", "RGB"):
                return img.copy()
            # Other 8-bit modes: grayscale ones stay grayscale, everything else (palette, CMYK, RGBA) becomes RGB.
            return img.convert("L" if mode in ("1", "LA", "La") else "RGB")
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {path}") from None
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image {path} is refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from None
