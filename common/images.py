"""Image files of any bit depth and mode read as 8-bit greyscale or RGB, the way images are exported in the wild.

PIL's ``convert("L")`` and ``convert("RGB")`` clip 16-bit and 32-bit pixels to 255, so a 16-bit PNG (the usual export
of a DICOM radiograph, or of a microscope camera) becomes a white image without a word. Here such images are rescaled
from their own value range, alpha is composited over a background, modes with no meaningful conversion are refused
with one line, and so is an image above PIL's decompression-bomb pixel limit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EIGHT_BIT = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA = {"LA", "La", "RGBA", "RGBa", "PA"}
_WIDE = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def to_grey8(image: Image.Image, path: Path | str = "image") -> np.ndarray:
    """(H, W) uint8 grey pixels of a PIL image.

    8-bit modes convert as PIL does; alpha is composited over black (transparent = background); 16-bit, 32-bit
    integer and float images are rescaled linearly from their minimum..maximum to 0..255 (a constant image maps
    to 0), so a 12-bit radiograph stored in a 16-bit PNG keeps its contrast.
    """
    mode = image.mode
    if mode in _ALPHA:
        rgba = image.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        return np.round(grey * alpha).astype(np.uint8)
    if mode in _EIGHT_BIT:
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode in _WIDE:
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise DataError(path, "image holds non-finite pixel values")
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, np.uint8)
        return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)
    raise DataError(path, f"unsupported image mode {mode!r}; save it as 8- or 16-bit greyscale or RGB")


def to_rgb8(image: Image.Image, path: Path | str = "image", background: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of a PIL image: 8-bit modes convert as PIL does, alpha is composited over a grey
    ``background`` level, and wide (16-bit, 32-bit, float) greyscale is rescaled as in ``to_grey8``."""
    mode = image.mode
    if mode in _ALPHA:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return np.round(rgba[..., :3] * alpha + background * (1 - alpha)).astype(np.uint8)
    if mode in _EIGHT_BIT:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if mode in _WIDE:
        return np.repeat(to_grey8(image, path)[..., None], 3, axis=-1)
    raise DataError(path, f"unsupported image mode {mode!r}; save it as 8- or 16-bit greyscale or RGB")


def _open(path: Path, what: str, convert) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        with Image.open(path) as handle:
            handle.load()
            return convert(handle, path)
    except Image.DecompressionBombError as err:
        raise DataError(path, f"{what} has more pixels than PIL's safety limit ({Image.MAX_IMAGE_PIXELS * 2:,}); "
                              "it may be a decompression bomb") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(path, f"{what} does not decode ({err})") from err


def read_grey(path: Path, what: str = "image") -> Image.Image:
    """Open an image file as an 8-bit greyscale PIL image; a missing or undecodable file is a DataError."""
    return Image.fromarray(_open(path, what, to_grey8))


def read_rgb(path: Path, what: str = "image", background: int = 0) -> Image.Image:
    """Open an image file as an 8-bit RGB PIL image (16-bit rescaled, alpha over ``background``); a missing,
    undecodable or oversized file is a DataError naming it."""
    return Image.fromarray(_open(path, what, lambda image, where: to_rgb8(image, where, background)))


def square_resize(image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Pad to a centred square on black, then resize: a radiograph keeps its aspect ratio (no squashed heart)."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return np.asarray(canvas.resize((size, size), resample))


def imagenet_normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) grey -> float (..., 3, H, W) with the ImageNet statistics pretrained encoders expect."""
    x = torch.as_tensor(np.asarray(images)).float().div(255.0).unsqueeze(-3)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std
