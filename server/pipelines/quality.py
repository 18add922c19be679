"""Image-quality checks on the analysed face. They are reported, not enforced: the caller decides."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import cv2
import numpy as np


class QualityIssue(enum.Enum):
    FACE_NOT_FOUND = "face_not_found"
    MULTIPLE_FACES = "multiple_faces"
    FACE_TOO_SMALL = "face_too_small"
    FACE_CLOSE_TO_BORDER = "face_close_to_border"
    TOO_DARK = "too_dark"
    TOO_BLURRY = "too_blurry"
    TOO_BRIGHT = "too_bright"


@dataclass(frozen=True)
class QualityConfig:
    min_face_px: int = 48
    """A face box whose shorter side is below this is FACE_TOO_SMALL."""
    dark_mean: float = 40.0
    """Mean grey level of the face below this is TOO_DARK."""
    bright_mean: float = 225.0
    """Mean grey level of the face above this is TOO_BRIGHT."""
    blur_laplacian_var: float = 40.0
    """Variance of the Laplacian of the face (resized to 112x112) below this is TOO_BLURRY. The sample images
    measure 234-593; a 9x9 Gaussian blur brings them under 10."""

    def __post_init__(self) -> None:
        if not 0 <= self.dark_mean < self.bright_mean <= 255:
            raise ValueError(f"need 0 <= dark_mean ({self.dark_mean}) < bright_mean ({self.bright_mean}) <= 255")


def assess_face(bgr: np.ndarray, box: tuple[int, int, int, int], cfg: QualityConfig) -> list[QualityIssue]:
    height, width = bgr.shape[:2]
    x, y, w, h = box
    issues: list[QualityIssue] = []
    if min(w, h) < cfg.min_face_px:
        issues.append(QualityIssue.FACE_TOO_SMALL)
    if x <= 0 or y <= 0 or x + w >= width or y + h >= height:
        issues.append(QualityIssue.FACE_CLOSE_TO_BORDER)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, width), min(y + h, height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return issues
    grey = cv2.cvtColor(bgr[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY)
    mean = float(grey.mean())
    if mean < cfg.dark_mean:
        issues.append(QualityIssue.TOO_DARK)
    elif mean > cfg.bright_mean:
        issues.append(QualityIssue.TOO_BRIGHT)
    small = cv2.resize(grey, (112, 112), interpolation=cv2.INTER_AREA)
    if float(cv2.Laplacian(small, cv2.CV_64F).var()) < cfg.blur_laplacian_var:
        issues.append(QualityIssue.TOO_BLURRY)
    return issues
