"""Decode untrusted image bytes into an upright BGR array, with limits checked before any pixel is decoded."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import FieldViolation, InvalidArgumentError

_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 * 1024 * 1024
    """Largest encoded image accepted."""
    max_pixels: int = 40_000_000
    """Largest width x height accepted, checked from the header before decoding (decompression bombs)."""
    min_side: int = 32
    """Smallest width or height accepted: below this no face can be analysed."""


@dataclass(frozen=True)
class DecodedImage:
    bgr: np.ndarray  # H x W x 3 uint8, EXIF orientation applied
    format: str  # "jpeg" | "png" | "webp"
    exif_orientation: int  # 1 (none) .. 8, as found in the file

    @property
    def width(self) -> int:
        return int(self.bgr.shape[1])

    @property
    def height(self) -> int:
        return int(self.bgr.shape[0])


def decode_image(data: bytes, limits: ImageLimits, field: str = "image.data") -> DecodedImage:
    """Decode JPEG / PNG / WebP bytes; every problem is an InvalidArgumentError naming ``field``."""

    def bad(description: str) -> InvalidArgumentError:
        return InvalidArgumentError(FieldViolation(field, description))

    if not data:
        raise bad("is empty; send an encoded JPEG, PNG or WebP image")
    if len(data) > limits.max_bytes:
        raise bad(f"is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise bad(f"declares too many pixels (over the limit of {limits.max_pixels})") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise bad("is not a decodable JPEG, PNG or WebP image") from exc
    fmt = _FORMATS.get(im.format or "")
    if fmt is None:
        raise bad(f"has unsupported format {im.format}; use JPEG, PNG or WebP")
    width, height = im.size
    if width * height > limits.max_pixels:
        raise bad(f"declares {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}")
    try:
        im.load()
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        upright = ImageOps.exif_transpose(im) if orientation != 1 else im
        rgb = upright.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise bad("is corrupt or truncated and could not be decoded") from exc
    if min(rgb.size) < limits.min_side:
        raise bad(f"is {rgb.size[0]}x{rgb.size[1]} px; each side must be at least {limits.min_side} px")
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    return DecodedImage(bgr=bgr, format=fmt, exif_orientation=orientation if 1 <= orientation <= 8 else 1)
