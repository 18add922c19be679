"""Clip preprocessing: detection frames, stable box, fps resampling with padding, apex spotting."""

import numpy as np

from engines.vision.clip_window import (
    ClipSpec,
    SparseSpotter,
    detection_frames,
    model_input,
    model_window,
    spot_apex,
    square_crop_box,
    stable_box,
)


def test_detection_frames_spread_over_the_clip() -> None:
    assert detection_frames(100, 5) == [0, 25, 50, 74, 99]
    assert detection_frames(3, 5) == [0, 1, 2]


def test_stable_box_is_the_median_and_reports_coverage() -> None:
    box, cov = stable_box([(10, 10, 50, 50), None, (12, 11, 50, 52), (100, 100, 10, 10), (11, 10, 50, 50)])
    assert box == (11, 10, 50, 50) and cov == 0.8  # medians: the outlier frame does not move it
    assert stable_box([None, None]) == (None, 0.0)


def test_square_crop_stays_inside() -> None:
    assert square_crop_box((0, 0, 40, 40), 100, 100, 1.5) == (0, 0, 60, 60)
    x0, _y0, x1, y1 = square_crop_box((80, 80, 40, 40), 100, 100, 1.5)
    assert (x1, y1) == (100, 100) and x1 - x0 == 60


def test_resampling_200_to_50_fps_takes_every_fourth_frame_around_the_apex() -> None:
    w = model_window(n_frames=100, capture_fps=200, model_fps=50, clip_len=16, apex_index=50)
    assert w.indices == tuple(range(18, 82, 4)) and w.padded == 0


def test_short_clips_are_padded_by_repeating_edge_frames() -> None:
    w = model_window(n_frames=20, capture_fps=200, model_fps=50, clip_len=16, apex_index=10)
    assert w.indices[0] == 0 and w.indices[-1] == 19
    assert w.padded == sum(1 for i in range(16) if not 0 <= round(10 + (i - 8) * 4) <= 19)


def test_low_frame_rate_capture_repeats_frames() -> None:
    w = model_window(n_frames=30, capture_fps=25, model_fps=50, clip_len=4, apex_index=10)
    assert w.indices == (9, 10, 10, 10) or len(set(w.indices)) < 4


def test_apex_spotter_finds_peak_motion() -> None:
    frames = [np.zeros((32, 32), np.uint8) for _ in range(60)]
    for t in range(60):
        frames[t][10:20, 10:20] = int(200 * np.exp(-((t - 37) ** 2) / 20))
    assert abs(spot_apex(frames, 200.0) - 37) <= 1


def _sparse_apex(frames: list[np.ndarray], fps: float) -> tuple[int, int]:
    """The sparse spotter's apex and how many frames it read, reading only what it asks for."""
    spotter = SparseSpotter(len(frames), fps)
    thumbs = {i: frames[i] for i in spotter.coarse()}
    thumbs.update({i: frames[i] for i in spotter.refine(thumbs)})
    return spotter.apex(thumbs), len(thumbs)


def test_sparse_spotter_answers_like_the_full_spotter_reading_fewer_frames() -> None:
    rng = np.random.default_rng(7)
    reads = []
    for clip in range(40):
        n, peak, width = 80, int(rng.integers(5, 75)), float(rng.uniform(4, 60))
        frames = []
        for t in range(n):
            g = rng.integers(0, 6, (32, 32)).astype(np.float64)  # sensor noise on every frame
            g[8:24, 8:24] += 120 * np.exp(-((t - peak) ** 2) / width)
            frames.append(g.astype(np.uint8))
        for fps in (200.0, 100.0):
            apex, read = _sparse_apex(frames, fps)
            assert apex == spot_apex(frames, fps), (clip, fps)
            reads.append(read)
    assert max(reads) < 60  # of 80: the coarse pass (every 4th or 2nd frame) and the peak's neighbourhood


def test_sparse_spotter_reads_every_frame_when_there_is_nothing_to_skip() -> None:
    frames = [np.full((8, 8), t, np.uint8) for t in range(30)]
    assert SparseSpotter(30, 30.0).coarse() == list(range(30))  # 30 fps: a 20 ms window is one frame
    assert _sparse_apex(frames, 30.0)[0] == spot_apex(frames, 30.0)
    assert _sparse_apex(frames[:2], 200.0) == (1, 2)


def test_model_input_is_the_centre_of_the_training_crop() -> None:
    spec = ClipSpec(clip_len=4, fps=50, size=8, margin_px=2)
    frames = [np.full((40, 40, 3), i, np.uint8) for i in range(20)]
    x, _w = model_input(frames, (0, 0, 40, 40), 10, 200.0, spec)
    assert x.shape == (3, 4, 8, 8)
    assert [int(x[0, t, 0, 0]) for t in range(4)] == [2, 6, 10, 14]
