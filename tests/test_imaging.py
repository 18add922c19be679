"""Decoding untrusted bytes: formats, EXIF orientation, and every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from engines.errors import InvalidArgumentError
from engines.vision.imaging import ImageLimits, decode_image
from tests.images import encode, gradient, png_declaring

LIMITS = ImageLimits()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_round_trip(fmt: str) -> None:
    img = gradient()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(img, fmt, **kw), LIMITS)
    assert out.format == fmt.lower()
    np.testing.assert_array_equal(out.bgr, img)


def test_jpeg_decodes_to_bgr() -> None:
    out = decode_image(encode(gradient(), "JPEG", quality=95), LIMITS)
    assert out.format == "jpeg" and out.bgr.shape == (48, 64, 3)
    assert out.bgr[5, 5].tolist()[0] > 200  # blue corner stays in channel 0 (BGR)


def test_exif_orientation_is_applied() -> None:
    img = gradient()
    # Orientation 6 means "rotate 90 degrees clockwise to display": the stored image is the upright one
    # rotated counter-clockwise.
    stored = np.ascontiguousarray(np.rot90(img, k=1))
    out = decode_image(encode(stored, "PNG", exif_orientation=6), LIMITS)
    assert out.exif_orientation == 6
    np.testing.assert_array_equal(out.bgr, img)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation: int) -> None:
    from io import BytesIO

    from PIL import Image, ImageOps

    stored = gradient(64, 48)
    data = encode(stored, "PNG", exif_orientation=orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(BytesIO(data))).convert("RGB"))[:, :, ::-1]
    np.testing.assert_array_equal(decode_image(data, LIMITS).bgr, expected)


def test_truncated_jpeg_with_complete_thumbnail_markers_is_refused() -> None:
    data = encode(gradient(256, 256), "JPEG")
    cut = data[: len(data) - 200]
    assert b"\xff\xd9" not in cut[-2:]
    assert "corrupt or truncated" in violation(cut)


def violation(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        decode_image(data, limits)
    (v,) = info.value.violations
    assert v.field == "image.data"
    return v.description


def test_empty() -> None:
    assert "empty" in violation(b"")


def test_random_bytes() -> None:
    assert "not a decodable" in violation(np.random.default_rng(0).bytes(1000))


def test_truncated_jpeg() -> None:
    data = encode(gradient(256, 256), "JPEG")
    assert "corrupt or truncated" in violation(data[: len(data) // 2])


def test_tiny_image() -> None:
    assert "at least 32 px" in violation(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))


def test_pixel_bomb_is_refused_from_the_header() -> None:
    msg = violation(png_declaring(30000, 30000))
    assert "pixels" in msg


def test_too_many_bytes() -> None:
    assert "over the limit" in violation(b"x" * 2000, ImageLimits(max_bytes=1000))


def test_unsupported_format() -> None:
    assert "unsupported format" in violation(encode(gradient(), "BMP"))


def test_plain_jpeg_headers_are_read_without_pillow_and_agree_with_it() -> None:
    from io import BytesIO

    from PIL import Image

    from engines.vision.imaging import probe_image
    from tests.images import plain_jpeg_size

    for w, h in ((64, 48), (180, 240), (333, 101)):
        data = encode(gradient(w, h), "JPEG", quality=90)
        assert plain_jpeg_size(data) == Image.open(BytesIO(data)).size == (w, h)
        header = probe_image(data, LIMITS)
        assert (header.format, header.width, header.height, header.orientation) == ("jpeg", w, h, 1)
    # A JPEG with EXIF goes to Pillow, which reads its orientation.
    rotated = encode(gradient(64, 48), "JPEG", exif_orientation=6)
    assert plain_jpeg_size(rotated) is None
    header = probe_image(rotated, LIMITS)
    assert header.orientation == 6 and (header.width, header.height) == (48, 64)


def test_a_plain_jpeg_declaring_too_many_pixels_is_refused_from_its_header() -> None:
    data = bytearray(encode(gradient(64, 48), "JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")  # height, width
    assert "30000x30000" in violation(bytes(data))
