"""The PNG chunk walk that reads headers: it agrees with Pillow on sizes and orientation (an eXIf chunk before or
after the image data), finds truncation, bounds its own work, and reads no pixel."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from engines.errors import InvalidArgumentError
from engines.vision.imaging import ImageLimits, decode_image, probe_image
from engines.vision.png_header import MAX_CHUNKS, PNG_SIGNATURE, TooManyChunksError, png_header
from tests.images import encode, gradient, png_chunk


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], len(PNG_SIGNATURE)
    while i < len(data):
        length, kind = struct.unpack_from(">I4s", data, i)
        out.append((kind, data[i:i + 12 + length]))
        i += 12 + length
    return out


def exif_after_image_data(data: bytes) -> bytes:
    """The same PNG with its eXIf chunk moved behind the image data, where libpng may write it."""
    parts = chunks(data)
    exif = [c for k, c in parts if k == b"eXIf"]
    body = [c for k, c in parts if k not in (b"eXIf", b"IEND")]
    return PNG_SIGNATURE + b"".join(body) + b"".join(exif) + parts[-1][1]


def pngs() -> list[bytes]:
    img = np.random.default_rng(0).integers(0, 256, (61, 97, 3), np.uint8)
    return [encode(img, "PNG"), encode(img, "PNG", optimize=True),
            cv2.imencode(".png", img)[1].tobytes(), cv2.imencode(".png", img[:, :, 0])[1].tobytes(),
            cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 0])[1].tobytes()]


def test_sizes_agree_with_pillow() -> None:
    for data in pngs():
        header = png_header(data)
        assert header is not None and not header.truncated and header.exif is None
        assert (header.width, header.height) == Image.open(io.BytesIO(data)).size == (97, 61)


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_agrees_with_pillow_wherever_the_exif_chunk_is(orientation: int, after: bool) -> None:
    data = encode(gradient(64, 48), "PNG", exif_orientation=orientation)
    if after:
        data = exif_after_image_data(data)
        kinds = [k for k, _ in chunks(data)]
        assert kinds.index(b"eXIf") > kinds.index(b"IDAT")
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation
    assert probe_image(data, ImageLimits()).orientation == orientation
    stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert stored is not None
    upright = decode_image(data, ImageLimits()).bgr
    assert upright.shape == (stored.shape if orientation < 5 else (stored.shape[1], stored.shape[0], 3))


def test_a_cut_stream_is_truncated_and_refused() -> None:
    data = encode(gradient(256, 256), "PNG")
    for cut in (len(data) - 12, len(data) - 13, len(data) // 2, 40):
        header = png_header(data[:cut])
        assert header is not None and header.truncated
        with pytest.raises(InvalidArgumentError, match="corrupt or truncated"):
            probe_image(data[:cut], ImageLimits())


def test_other_bytes_are_left_to_pillow() -> None:
    assert png_header(encode(gradient(), "JPEG")) is None
    assert png_header(b"") is None
    assert png_header(PNG_SIGNATURE + png_chunk(b"IDAT", b"")) is None  # IHDR must come first


def test_the_walk_is_bounded() -> None:
    ihdr = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    data = PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"tEXt", b"") * MAX_CHUNKS + png_chunk(b"IEND", b"")
    with pytest.raises(TooManyChunksError):
        png_header(data)
    with pytest.raises(InvalidArgumentError, match="more than"):
        probe_image(data, ImageLimits())


def test_the_header_check_decodes_no_pixel() -> None:
    # Well-formed chunks around image data that is not a zlib stream: the header check passes it (it never
    # inflates the data, as Pillow's getexif did), and the decode is what refuses it.
    ihdr = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    data = PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"\x00" * 64) + png_chunk(b"IEND", b"")
    header = probe_image(data, ImageLimits())
    assert (header.format, header.pixels) == ("png", 64 * 48)
    with pytest.raises(InvalidArgumentError):
        decode_image(data, ImageLimits(), header=header)
