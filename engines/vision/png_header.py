"""What a PNG's chunks declare, read straight from the bytes: the size (IHDR), the EXIF block (an eXIf chunk, before
or after the image data: libpng writes either) and whether the stream stops before its end.

Pillow finds an eXIf chunk that follows the image data only by decoding the image (``PngImageFile.getexif`` calls
``load()``), so reading a PNG's orientation through it decoded every PNG whole: 5.9 ms for 640x480 (AMX Xeon), as
long as the decode that follows, and outside the decoded-pixel budget that the header check exists to fill before
any pixel is decoded. Walking the chunk headers skips the image data: ~60 chunks and ~30 us for such a PNG.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A PNG within the 8 MB request limit written by any common encoder has at most a few thousand chunks (libpng
# writes 8 KiB of image data a chunk); tens of thousands of tiny chunks only make the walk expensive (12 bytes
# each: 700k chunks in 8 MB, ~0.3 s of GIL-held Python).
MAX_CHUNKS = 1 << 16
_CHUNK_HEAD = struct.Struct(">I4s")
_IHDR = struct.Struct(">I4sII")


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    exif: bytes | None  # the eXIf chunk's data (a TIFF-structured EXIF block), if any
    truncated: bool  # a chunk runs past the end of the bytes, or they end before IEND


class TooManyChunksError(ValueError):
    pass


def png_header(data: bytes) -> PngHeader | None:
    """The header of a PNG whose first chunk is a well-formed IHDR, or None for anything else (Pillow then decides,
    and refuses what is broken). Raises TooManyChunksError past ``MAX_CHUNKS`` chunks."""
    n = len(data)
    if not data.startswith(PNG_SIGNATURE) or n < 33:
        return None
    length, kind, width, height = _IHDR.unpack_from(data, 8)
    if kind != b"IHDR" or length != 13 or width == 0 or height == 0:
        return None
    i, exif, chunks = 33, None, 1
    while i + 8 <= n:
        length, kind = _CHUNK_HEAD.unpack_from(data, i)
        end = i + 12 + length
        if end > n:
            break
        if kind == b"IEND":
            return PngHeader(width, height, exif, truncated=False)
        if kind == b"eXIf" and exif is None:  # (at most one is allowed; the first is the one Pillow reads)
            exif = data[i + 8:i + 8 + length]
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise TooManyChunksError(f"has more than {MAX_CHUNKS} PNG chunks")
        i = end
    return PngHeader(width, height, exif, truncated=True)
