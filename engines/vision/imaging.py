"""Decode untrusted image bytes into an upright BGR array, with limits checked before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from engines.errors import FieldViolation, InvalidArgumentError
from engines.vision.jpeg_header import JpegFrame, jpeg_frame, jpeg_is_truncated, too_many_scans
from engines.vision.png_header import TooManyChunksError, png_header

_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
_EXIF_ORIENTATION = 0x0112
_TRUNCATED = "is corrupt or truncated and could not be decoded"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 * 1024 * 1024
    """Largest encoded image accepted."""
    max_pixels: int = 40_000_000
    """Largest width x height accepted, checked from the header before decoding (decompression bombs)."""
    min_side: int = 32
    """Smallest width or height accepted: below this no face can be analysed."""
    max_scans: int = 100
    """Most scans a progressive JPEG may have. Encoders write 6-20; each scan, a few bytes or not, can cost the
    decoder a pass over the whole image (``engines/vision/jpeg_header.py``)."""


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


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares, read without decoding a pixel."""

    format: str  # "jpeg" | "png" | "webp"
    stored_width: int
    stored_height: int
    orientation: int  # EXIF orientation 1..8

    @property
    def width(self) -> int:
        """Upright width (orientations 5..8 swap the sides)."""
        return self.stored_height if self.orientation >= 5 else self.stored_width

    @property
    def height(self) -> int:
        return self.stored_width if self.orientation >= 5 else self.stored_height

    @property
    def pixels(self) -> int:
        return self.stored_width * self.stored_height


def probe_image(data: bytes, limits: ImageLimits, field: str = "image.data") -> ImageHeader:
    """Every check that needs no pixels: size in bytes, format, declared pixels (decompression bombs), a
    truncated JPEG or PNG. Only the header is read (from the marker segments of a JPEG without EXIF and the chunks of
    a PNG, else by Pillow). Problems are InvalidArgumentErrors naming ``field``."""

    def bad(description: str) -> InvalidArgumentError:
        return InvalidArgumentError(FieldViolation(field, description))

    if not data:
        raise bad("is empty; send an encoded JPEG, PNG or WebP image")
    if len(data) > limits.max_bytes:
        raise bad(f"is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    frame = jpeg_frame(data)
    if frame is not None and not frame.exif:
        header = _checked(ImageHeader("jpeg", frame.width, frame.height, 1), limits, bad)
        _check_jpeg(data, limits, bad, frame)
        return header
    try:
        png = png_header(data)
    except TooManyChunksError as exc:
        raise bad(str(exc)) from None
    if png is not None:
        header = _checked(ImageHeader("png", png.width, png.height, _orientation(png.exif, bad)), limits, bad)
        if png.truncated:
            raise bad(_TRUNCATED)
        return header
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
    header = _checked(ImageHeader(fmt, *im.size, orientation if 1 <= orientation <= 8 else 1), limits, bad)
    if fmt == "jpeg":  # (one whose segments the walk could not read is taken as progressive: its scans are counted)
        _check_jpeg(data, limits, bad, frame)
    return header


def _orientation(exif: bytes | None, bad: Callable[[str], InvalidArgumentError]) -> int:
    """The orientation tag of an EXIF block (Pillow's reader, as for the other formats); 1 where there is none."""
    if exif is None:
        return 1
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        orientation = int(parsed.get(_EXIF_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, TypeError, struct.error) as exc:
        raise bad("is not a decodable JPEG, PNG or WebP image") from exc
    return orientation if 1 <= orientation <= 8 else 1


def _checked(header: ImageHeader, limits: ImageLimits, bad: Callable[[str], InvalidArgumentError]) -> ImageHeader:
    """The limits every format's header is held to."""
    width, height = header.stored_width, header.stored_height
    if width * height > limits.max_pixels:
        raise bad(f"declares {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise bad(f"is {width}x{height} px; each side must be at least {limits.min_side} px")
    return header


def _check_jpeg(data: bytes, limits: ImageLimits, bad: Callable[[str], InvalidArgumentError],
                frame: JpegFrame | None) -> None:
    """What a JPEG's bytes must also pass: no scan after its last end-of-image, and a bounded number of scans."""
    if jpeg_is_truncated(data):
        raise bad(_TRUNCATED)
    if reason := too_many_scans(data, frame, limits.max_scans):
        raise bad(reason)


# OpenCV's reduced reads: a JPEG is decoded at 1/2, 1/4 or 1/8 scale inside libjpeg (in the DCT domain, so
# the work shrinks with the output); other formats are decoded whole and then downsized.
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_image(data: bytes, limits: ImageLimits, field: str = "image.data",
                 header: ImageHeader | None = None, reduce: int = 1) -> DecodedImage:
    """Decode JPEG / PNG / WebP bytes; every problem is an InvalidArgumentError naming ``field``.

    The header is checked first (``probe_image``, or the one given) so limits hold before any pixel is decoded;
    OpenCV then decodes (BGR directly, the decoder the liveness models were used with). ``reduce`` (1, 2, 4 or 8)
    decodes at that fraction of each side.
    """
    header = header or probe_image(data, limits, field)
    stored = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduce] | cv2.IMREAD_IGNORE_ORIENTATION)
    expected = {(-(-header.stored_height // reduce), -(-header.stored_width // reduce)),  # libjpeg rounds up,
                (header.stored_height // reduce, header.stored_width // reduce)}  # a downsized PNG rounds down
    if stored is None or stored.shape[:2] not in expected:
        raise InvalidArgumentError(FieldViolation(field, _TRUNCATED))
    bgr = apply_orientation(stored, header.orientation)
    return DecodedImage(bgr=np.ascontiguousarray(bgr), format=header.format, exif_orientation=header.orientation)
