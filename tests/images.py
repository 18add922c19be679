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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb, as far as the header goes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """A BGR image with distinct corners, so orientation mistakes are visible."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 2] = (255, 0, 0)
    img[: height // 2, width // 2:] = (0, 255, 0)
    img[height // 2:, : width // 2] = (0, 0, 255)
    img[height // 2:, width // 2:] = (255, 255, 255)
    return img


def with_extra_scans(progressive_jpeg: bytes, n: int) -> bytes:
    """A progressive JPEG with ``n`` scans added before its end: each a dozen bytes (one Huffman code, an end-of-band
    run over every luma block) that make the decoder pass over every block again (libjpeg-turbo's LJT-01-003)."""
    width, height = Image.open(io.BytesIO(progressive_jpeg)).size
    end = progressive_jpeg.rindex(b"\xff\xd9")
    # An AC table (class 1, id 2) whose one code, "0", is symbol 0xE0: an end-of-band run of 2^14 + 14 more bits.
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 1 + 16 + 1) + b"\x12" + bytes([1] + [0] * 15) + b"\xe0"
    blocks = -(-width // 8) * -(-height // 8) * 4  # (MCU padding included, generously)
    bits = ("0" + "1" * 14) * -(-blocks // 32767)  # each code: a run of 32767 blocks
    bits += "1" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    # Start of scan: 1 component (id 1, luma), DC table 0 / AC table 2, spectral 1..63, successive approximation 0.
    sos = b"\xff\xda\x00\x08\x01\x01\x02\x01\x3f\x00"
    return progressive_jpeg[:end] + dht + (sos + data) * n + progressive_jpeg[end:]


def _riff(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def mjpeg_avi(jpegs: list[bytes], width: int, height: int, fps: int = 30) -> bytes:
    """An AVI whose frames are these JPEG files byte for byte (OpenCV's writer re-encodes whatever it is given)."""
    n, biggest = len(jpegs), max(len(j) for j in jpegs)
    avih = struct.pack("<10I4I", 1_000_000 // fps, 0, 0, 0x10, n, 0, 1, biggest, width, height, 0, 0, 0, 0)
    strh = b"vids" + b"MJPG" + struct.pack("<IHHIIIIIIIIhhhh", 0, 0, 0, 0, 1, fps, 0, n, biggest, 0xFFFFFFFF, 0,
                                           0, 0, width, height)
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    strl = _riff(b"LIST", b"strl" + _riff(b"strh", strh) + _riff(b"strf", strf))
    hdrl = _riff(b"LIST", b"hdrl" + _riff(b"avih", avih) + strl)
    movi, index, offset = [], [], 4  # idx1 offsets count from the "movi" tag
    for j in jpegs:
        chunk = _riff(b"00dc", j)
        index.append(b"00dc" + struct.pack("<III", 0x10, offset, len(j)))  # 0x10: a key frame
        movi.append(chunk)
        offset += len(chunk)
    body = b"AVI " + hdrl + _riff(b"LIST", b"movi" + b"".join(movi)) + _riff(b"idx1", b"".join(index))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header of a JPEG with no EXIF block before its first scan (the header check's
    fast path), or None: another format, an EXIF block, or segments that do not parse."""
    from engines.vision.jpeg_header import jpeg_frame

    frame = jpeg_frame(data)
    return (frame.width, frame.height) if frame is not None and not frame.exif else None
