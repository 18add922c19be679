"""What a JPEG's marker segments declare, read straight from the bytes.

A clip carries 80 frames, and every frame's header is checked before any pixel is decoded. ``imagesize`` read
them through a file object and a ``typing.Protocol`` check at ~20 us a frame, and ``bytes.find`` for an EXIF
block and ``rfind`` for the last start-of-scan scanned each whole frame: together ~29 us of GIL-held Python a
frame, 2.3 ms a clip, on the thread pool where it delayed every other thread wanting the GIL (measured at 16
clips in flight: header reading was 23 % of the time the GIL was held). Walking the few segments before the scan
and looking only behind the last end-of-image marker is ~4 us a frame (~5 us with the limit checks).

A progressive JPEG's scans are counted too (``jpeg_scans``): a scan may be a few bytes (one end-of-band run over
every block) yet cost the decoder a pass over every block of the frame, so scans appended to a 640x480 JPEG cost
~20 us each (10,000 of them, 120 kB, made OpenCV's decode take 215 ms; 100,000 in 1.5 MB, 2.1 s; at 2000x2000,
~250 us each). This is libjpeg-turbo's LJT-01-003 ("Two Issues with the JPEG Standard"), which even a fully valid
file can exploit, and whose remedy is to limit the number of scans, as libjpeg-turbo's ``-maxscans`` and NVIDIA
DALI (500) do. Only progressive frames are counted: a sequential scan carries data for every block it covers, so
its cost follows its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Start-of-frame markers (every coding process; 0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_EXIF = b"Exif\x00\x00"


@dataclass(frozen=True)
class JpegFrame:
    width: int
    height: int
    progressive: bool  # a progressive frame (SOF2, SOF6, SOF10, SOF14): its scans may each cover every block
    exif: bool  # an EXIF block before the first scan (an orientation to read, which Pillow does)


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """What the segments before a JPEG's first scan declare, or None: another format, or segments that do not parse
    (Pillow then decides, and refuses what is broken)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    n, i = len(data), 2
    size: tuple[int, int] | None = None
    progressive = exif = False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == _EOI:
            return None
        if marker == _SOS:
            return JpegFrame(size[0], size[1], progressive, exif) if size is not None else None
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        if marker in _SOF:
            if length < 7 or size is not None:
                return None
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            if width == 0 or height == 0:
                return None
            size, progressive = (width, height), marker in _PROGRESSIVE
        elif marker == _APP1 and data[i + 4:i + 10] == _EXIF:
            exif = True
        i += 2 + length
    return None


def jpeg_scans(data: bytes) -> int:
    """How many start-of-scan markers the bytes hold. Entropy-coded data never holds a bare 0xFFDA (a 0xFF there is
    followed by 0x00 or a restart marker), so this counts scans, plus any in an embedded thumbnail or, by chance,
    in an APPn payload: an upper bound. A C-level search, ~1 GB/s (60 us for a 65 kB JPEG)."""
    return data.count(b"\xff\xda")


def too_many_scans(data: bytes, frame: JpegFrame | None, max_scans: int) -> str:
    """Why a JPEG has too many scans, or "": a progressive frame (or one whose segments ``jpeg_frame`` could not
    read, taken as progressive) of more than ``max_scans``. The one rule for an image, a clip's frame and a Motion
    JPEG video's frame."""
    if (frame is None or frame.progressive) and (scans := jpeg_scans(data)) > max_scans:
        return (f"is a progressive JPEG of {scans} scans, over the limit of {max_scans} (each scan can cost a pass "
                "over the whole image)")
    return ""


def jpeg_is_truncated(data: bytes) -> bool:
    """True when a start-of-scan marker follows the last end-of-image marker (or there is no end-of-image marker
    but a scan). Entropy-coded data never holds a bare 0xFFD9, so a complete JPEG ends its last scan with one; an
    embedded thumbnail's markers all come earlier. Only the bytes after the last 0xFFD9 are searched for a scan
    (the whole file when there is none), which is the same test as comparing the last positions of the two."""
    eoi = data.rfind(b"\xff\xd9")
    return data.find(b"\xff\xda", eoi + 2 if eoi >= 0 else 0) >= 0
