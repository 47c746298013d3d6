"""Image decoding in one place: 8- and 16-bit PNG, JPEG, grayscale and RGB, always to 8-bit 'L' or 'RGB'.

16-bit images are rescaled to the full 8-bit range (PIL's own conversion clips I;16 values instead).
A file that is missing or does not decode raises :class:`ImageDecodeError`; no blank image is ever substituted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from embedkit.errors import EmbedkitError


class ImageDecodeError(EmbedkitError, ValueError):
    """An image file is missing, truncated or not an image."""


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
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return Image.fromarray(_rescale_to_uint8(np.asarray(img)), mode="L")
            if mode in ("L", "RGB"):
                return img.copy()
            # Other 8-bit modes: grayscale ones stay grayscale, everything else (palette, CMYK, RGBA) becomes RGB.
            return img.convert("L" if mode in ("1", "LA", "La") else "RGB")
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from None
