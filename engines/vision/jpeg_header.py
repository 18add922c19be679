"""What a JPEG's marker segments declare, read straight from the bytes.

A clip carries 80 frames, and every frame's header is checked before any pixel is decoded. ``imagesize`` read
them through a file object and a ``typing.Protocol`` check at ~20 us a frame, and ``bytes.find`` for an EXIF
block and ``rfind`` for the last start-of-scan scanned each whole frame: together ~29 us of GIL-held Python a
frame, 2.3 ms a clip, on the thread pool where it delayed every other thread wanting the GIL (measured at 16
clips in flight: header reading was 23 % of the time the GIL was held). Walking the few segments before the scan
and looking only behind the last end-of-image marker is ~4 us a frame (~5 us with the limit checks).
"""

from __future__ import annotations

# Start-of-frame markers (every coding process; 0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_EXIF = b"Exif\x00\x00"


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header of a JPEG with no EXIF block before its first scan (so no
    orientation to apply), or None: another format, an EXIF block, or segments that do not parse (Pillow then
    decides, and refuses what is broken)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    n, i = len(data), 2
    size: tuple[int, int] | None = None
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
            return size
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        if marker in _SOF:
            if length < 7 or size is not None:
                return None
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            if width == 0 or height == 0:
                return None
            size = (width, height)
        elif marker == _APP1 and data[i + 4:i + 10] == _EXIF:
            return None
        i += 2 + length
    return None


def jpeg_is_truncated(data: bytes) -> bool:
    """True when a start-of-scan marker follows the last end-of-image marker (or there is no end-of-image marker
    but a scan). Entropy-coded data never holds a bare 0xFFD9, so a complete JPEG ends its last scan with one; an
    embedded thumbnail's markers all come earlier. Only the bytes after the last 0xFFD9 are searched for a scan
    (the whole file when there is none), which is the same test as comparing the last positions of the two."""
    eoi = data.rfind(b"\xff\xd9")
    return data.find(b"\xff\xda", eoi + 2 if eoi >= 0 else 0) >= 0
