"""Prior boxes, CENTER_SIZE decoding and NMS of the detector's post-processing."""

import numpy as np

from engines.specs import DETECTOR_SPEC
from engines.vision.detection import DetectorInput, decode_detections, prepare_input, priors, resized_size


def test_resize_follows_the_upstream_rule() -> None:
    assert resized_size(480, 640, DETECTOR_SPEC) == (166, 221)
    assert resized_size(640, 480, DETECTOR_SPEC) == (221, 166)
    assert resized_size(100, 120, DETECTOR_SPEC) == (100, 120)  # under 192^2 px: kept
    assert min(resized_size(4000, 100, DETECTOR_SPEC)) >= DETECTOR_SPEC.min_side  # never below what engines accept


def test_prior_count_and_order_match_caffe() -> None:
    p = priors(DETECTOR_SPEC, 166, 221)
    # Feature maps 21x28, 11x14, 6x7 with two sizes each.
    assert p.shape == (2 * (21 * 28 + 11 * 14 + 6 * 7), 4)
    np.testing.assert_allclose(p[0], [4, 4, 16, 16])
    np.testing.assert_allclose(p[1], [4, 4, 32, 32])
    np.testing.assert_allclose(p[2], [12, 4, 16, 16])  # next column of the same row


def _inputs(n: int) -> DetectorInput:
    return DetectorInput(np.zeros((3, 221, 166), np.float32), 166, 221)


def test_zero_regression_decodes_to_the_prior_and_low_scores_are_dropped() -> None:
    inp = _inputs(0)
    p = priors(DETECTOR_SPEC, 166, 221)
    loc = np.zeros((p.shape[0], 4), np.float32)
    conf = np.zeros((p.shape[0], 2), np.float32)
    conf[:, 0] = 1.0
    k = 2 * (21 * 10 + 8) + 1  # row 10, col 8, size 32
    conf[k] = [0.1, 0.9]
    dets = decode_detections(loc, conf, inp, DETECTOR_SPEC)
    assert len(dets) == 1 and abs(dets[0].score - 0.9) < 1e-6
    cx, cy, w, h = p[k]
    np.testing.assert_allclose(
        [dets[0].x1 * 166, dets[0].y1 * 221, dets[0].x2 * 166, dets[0].y2 * 221],
        [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-3)


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    inp = _inputs(0)
    p = priors(DETECTOR_SPEC, 166, 221)
    loc = np.zeros((p.shape[0], 4), np.float32)
    conf = np.zeros((p.shape[0], 2), np.float32)
    base = 2 * (21 * 10 + 8)
    conf[base + 1] = [0.2, 0.8]  # size-32 prior at (10, 8)
    conf[base + 3] = [0.1, 0.9]  # size-32 prior one column right: IoU 0.6 > 0.3
    conf[2 * (21 * 25 + 2)] = [0.3, 0.7]  # far away
    dets = decode_detections(loc, conf, inp, DETECTOR_SPEC)
    assert [round(d.score, 2) for d in dets] == [0.9, 0.7]


def test_pixel_box_uses_the_upstream_rounding() -> None:
    inp = _inputs(0)
    p = priors(DETECTOR_SPEC, 166, 221)
    conf = np.zeros((p.shape[0], 2), np.float32)
    conf[0] = [0, 1]
    det = decode_detections(np.zeros((p.shape[0], 4), np.float32), conf, inp, DETECTOR_SPEC)[0]
    x, y, w, _ = det.pixel_box(480, 640)
    assert (x, y) == (int(det.x1 * 480), int(det.y1 * 640))
    assert w == int(det.x2 * 480 - det.x1 * 480 + 1)


def test_input_is_mean_subtracted_bgr() -> None:
    img = np.full((221, 166, 3), (104, 117, 123), np.uint8)
    t = prepare_input(img, DETECTOR_SPEC).tensor
    assert t.shape == (3, 221, 166) and float(np.abs(t).max()) == 0.0


def _nms_per_candidate(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """The textbook form (each candidate against every kept box): what the fast form must equal."""
    keep: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-scores, kind="stable"):
        k = np.asarray(keep, dtype=int)
        inter = (np.clip(np.minimum(boxes[i, 2], boxes[k, 2]) - np.maximum(boxes[i, 0], boxes[k, 0]), 0, None)
                 * np.clip(np.minimum(boxes[i, 3], boxes[k, 3]) - np.maximum(boxes[i, 1], boxes[k, 1]), 0, None))
        if not np.any(inter / np.maximum(areas[i] + areas[k] - inter, 1e-12) > threshold):
            keep.append(int(i))
    return keep


def test_nms_equals_the_per_candidate_form_on_random_clusters() -> None:
    from engines.vision.detection import _nms

    rng = np.random.default_rng(7)
    for trial in range(50):
        n = int(rng.integers(1, 400))
        centres = rng.uniform(0, 1, (n, 2))
        if trial % 2:  # clusters of heavily overlapping boxes, as a face gives
            centres = rng.uniform(0.2, 0.8, (4, 2))[rng.integers(0, 4, n)] + rng.normal(0, 0.01, (n, 2))
        wh = rng.uniform(0.05, 0.3, (n, 2))
        boxes = np.concatenate([centres - wh / 2, centres + wh / 2], axis=1)
        scores = np.round(rng.uniform(0.1, 1.0, n), 2)  # rounded: ties must resolve the same way
        assert _nms(boxes, scores, 0.3) == _nms_per_candidate(boxes, scores, 0.3)
