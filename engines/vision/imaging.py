"""Decode untrusted image bytes into an upright BGR array, with limits checked before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from engines.errors import FieldViolation, InvalidArgumentError

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


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored image upright according to its EXIF orientation tag (1..8)."""
    if orientation == 2:
        return cv2.flip(img, 1)
    if orientation == 3:
        return cv2.rotate(img, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(img, 0)
    if orientation == 5:
        return np.ascontiguousarray(img.transpose(1, 0, 2))
    if orientation == 6:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return np.ascontiguousarray(img.transpose(1, 0, 2)[::-1, ::-1])
    if orientation == 8:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img


def _jpeg_is_truncated(data: bytes) -> bool:
    # Entropy-coded data never contains a bare 0xFFD9, so a complete JPEG has its end-of-image marker after the
    # last start-of-scan marker (an embedded thumbnail's markers all come earlier). libjpeg only warns on
    # truncation and fills the rest with grey, which must not be analysed as a face.
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def decode_image(data: bytes, limits: ImageLimits, field: str = "image.data") -> DecodedImage:
    """Decode JPEG / PNG / WebP bytes; every problem is an InvalidArgumentError naming ``field``.

    Pillow reads only the header (format, declared size, EXIF orientation) so limits are checked before any
    pixel is decoded; OpenCV then decodes (BGR directly, the decoder the liveness models were used with).
    """

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
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise bad(f"declares too many pixels (over the limit of {limits.max_pixels})") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
            raise bad("is not a decodable JPEG, PNG or WebP image") from exc
    fmt = _FORMATS.get(im.format or "")
    if fmt is None:
        raise bad(f"has unsupported format {im.format}; use JPEG, PNG or WebP")
    width, height = im.size
    if width * height > limits.max_pixels:
        raise bad(f"declares {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}")
    if fmt == "jpeg" and _jpeg_is_truncated(data):
        raise bad("is corrupt or truncated and could not be decoded")
    stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if stored is None or stored.shape[:2] != (height, width):
        raise bad("is corrupt or truncated and could not be decoded")
    orientation = orientation if 1 <= orientation <= 8 else 1
    bgr = apply_orientation(stored, orientation)
    if min(bgr.shape[:2]) < limits.min_side:
        raise bad(f"is {bgr.shape[1]}x{bgr.shape[0]} px; each side must be at least {limits.min_side} px")
    return DecodedImage(bgr=np.ascontiguousarray(bgr), format=fmt, exif_orientation=orientation)
