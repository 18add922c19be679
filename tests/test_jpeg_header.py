"""The JPEG marker walk that reads frame headers: it agrees with Pillow on sizes, sends EXIF files to Pillow, and
finds truncation exactly as comparing the last end-of-image and start-of-scan positions does."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from engines.errors import InvalidArgumentError
from engines.vision.imaging import ImageLimits, decode_image, probe_image
from engines.vision.jpeg_header import jpeg_frame, jpeg_is_truncated, jpeg_scans
from tests.images import encode, gradient, plain_jpeg_size, with_extra_scans


def noisy(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def variants() -> list[bytes]:
    """Baseline and progressive JPEGs from Pillow and OpenCV, 4:2:0 and 4:4:4, with restart markers, an
    ICC profile, a comment."""
    img = noisy(97, 61)
    out = [encode(img, "JPEG", quality=q, subsampling=s) for q in (50, 95) for s in (0, 2)]
    out.append(encode(img, "JPEG", quality=80, progressive=True))
    out.append(encode(img, "JPEG", quality=80, icc_profile=b"\x00" * 300, comment=b"hello"))
    out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())
    out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes())
    return out


def test_sizes_agree_with_pillow() -> None:
    for data in variants():
        assert plain_jpeg_size(data) == Image.open(io.BytesIO(data)).size == (97, 61)


def test_exif_blocks_and_other_formats_are_left_to_pillow() -> None:
    assert plain_jpeg_size(encode(gradient(), "JPEG", exif_orientation=6)) is None
    assert plain_jpeg_size(encode(gradient(), "PNG")) is None
    assert plain_jpeg_size(b"") is None
    # An APP1 that is not EXIF (XMP) does not hide the size.
    data = encode(gradient(), "JPEG", quality=90)
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x/>"
    with_xmp = data[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[2:]
    assert plain_jpeg_size(with_xmp) == (64, 48)


@pytest.mark.parametrize("cut", [2, 5, 21, 100, 300])
def test_broken_segments_are_left_to_pillow(cut: int) -> None:
    data = encode(gradient(), "JPEG", quality=90)
    assert plain_jpeg_size(data[:cut]) is None  # every cut here ends before the first scan
    assert plain_jpeg_size(data[:4] + b"\x00\x01" + data[6:]) is None  # a segment length below 2


def test_a_zero_size_frame_header_is_not_a_size() -> None:
    data = bytearray(encode(gradient(), "JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 7] = b"\x00\x00"
    assert plain_jpeg_size(bytes(data)) is None


def test_truncation_matches_the_last_marker_positions() -> None:
    for data in variants():
        cuts = [len(data), len(data) - 1, len(data) - 2, len(data) // 2, 300, 50, 3]
        for body in [data[:c] for c in cuts] + [data + b"\xff\xda\x00\x02", data + b"junk"]:
            assert jpeg_is_truncated(body) == (body.rfind(b"\xff\xd9") < body.rfind(b"\xff\xda"))
        assert not jpeg_is_truncated(data) and jpeg_is_truncated(data[:-2])


def test_progressive_frames_are_told_apart() -> None:
    img = noisy(97, 61)
    progressive = [encode(img, "JPEG", quality=80, progressive=True),
                   cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
                   encode(img, "JPEG", quality=80, progressive=True, exif=Image.Exif())]
    for data in progressive:
        frame = jpeg_frame(data)
        assert frame is not None and frame.progressive and (frame.width, frame.height) == (97, 61)
        assert 2 <= jpeg_scans(data) <= ImageLimits().max_scans  # what encoders write passes
        probe_image(data, ImageLimits())
    for data in variants()[:4]:
        frame = jpeg_frame(data)
        assert frame is not None and not frame.progressive and jpeg_scans(data) == 1
    with_exif = jpeg_frame(encode(img, "JPEG", exif_orientation=6))
    assert with_exif is not None and with_exif.exif


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_it_is_decoded() -> None:
    base = encode(noisy(640, 480), "JPEG", quality=75, progressive=True)
    bomb = with_extra_scans(base, 2000)
    assert jpeg_scans(bomb) == jpeg_scans(base) + 2000
    # The scans are real work for the decoder: OpenCV decodes the file, each added scan a pass over the blocks.
    assert cv2.imdecode(np.frombuffer(bomb, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(InvalidArgumentError, match="progressive JPEG of 2010 scans, over the limit of 100"):
        probe_image(bomb, ImageLimits())
    with pytest.raises(InvalidArgumentError, match="scans"):
        decode_image(bomb, ImageLimits())
    # Up to the limit it is decoded; the limit is a setting.
    assert decode_image(with_extra_scans(base, 90), ImageLimits()).bgr.shape == (480, 640, 3)
    probe_image(bomb, ImageLimits(max_scans=3000))
    # A sequential JPEG is not counted (its scans carry data for every block they cover).
    sequential = encode(noisy(64, 48), "JPEG", quality=90)
    assert not jpeg_frame(sequential).progressive  # type: ignore[union-attr]
