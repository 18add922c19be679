"""Hand-made image payloads for the decoding and bad-input tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(arr_bgr: np.ndarray, fmt: str, exif_orientation: int | None = None, **kw: object) -> bytes:
    im = Image.fromarray(np.ascontiguousarray(arr_bgr[:, :, ::-1]))
    buf = io.BytesIO()
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, fmt, exif=exif, **kw)
    else:
        im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb, as far as the header goes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """A BGR image with distinct corners, so orientation mistakes are visible."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 2] = (255, 0, 0)
    img[: height // 2, width // 2:] = (0, 255, 0)
    img[height // 2:, : width // 2] = (0, 0, 255)
    img[height // 2:, width // 2:] = (255, 255, 255)
    return img
