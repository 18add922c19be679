"""How two liveness classifiers' outputs become a score and a verdict: shared by the server's pipeline and the
INT8 parity gate, so the gate judges exactly what the server would answer."""

from __future__ import annotations

import enum

import numpy as np

# The served defaults (LivenessConfig's threshold and uncertainty margin), which the INT8 gate judges by too.
DEFAULT_THRESHOLD = 0.5
DEFAULT_MARGIN = 0.05


class Decision(enum.Enum):
    UNSPECIFIED = "unspecified"
    LIVE = "live"
    SPOOF = "spoof"
    UNCERTAIN = "uncertain"


def decide(live_score: float, threshold: float, margin: float) -> Decision:
    if live_score >= threshold + margin:
        return Decision.LIVE
    if live_score < threshold - margin:
        return Decision.SPOOF
    return Decision.UNCERTAIN


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return np.asarray(e / e.sum())
