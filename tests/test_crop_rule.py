"""The upstream crop rule: scale about the centre, clamp the scale, shift inside the image."""

import numpy as np

from engines.vision.crop import crop_for_model, crop_window


def test_centred_window_is_scale_times_the_box() -> None:
    x0, y0, x1, y1 = crop_window((400, 400, 100, 100), 1000, 1000, 2.0)
    assert (x0, y0, x1, y1) == (350, 350, 550, 550)


def test_window_sticking_out_is_shifted_not_shrunk() -> None:
    # Left/top overflow shifts right/down; the width stays scale * w.
    x0, y0, x1, y1 = crop_window((10, 10, 100, 100), 1000, 1000, 2.7)
    assert x0 == 0 and y0 == 0 and x1 == 270 and y1 == 270
    # Right/bottom overflow shifts left/up, clamped to W-1 / H-1.
    x0, y0, x1, y1 = crop_window((900, 900, 90, 90), 1000, 1000, 2.0)
    assert x1 == 999 and y1 == 999 and x0 == 999 - 180 and y0 == 999 - 180


def test_scale_is_clamped_so_the_window_fits() -> None:
    # A 4.0 scale on a 200 px box in a 480 x 640 image: s = min(4, 639/200, 479/200) = 2.395.
    x0, y0, x1, y1 = crop_window((140, 220, 200, 200), 480, 640, 4.0)
    assert x0 == 0 and x1 == 479
    assert abs((y1 - y0) - 479) <= 1


def test_window_is_not_forced_square() -> None:
    x0, y0, x1, y1 = crop_window((300, 300, 100, 200), 2000, 2000, 2.0)
    assert (x1 - x0, y1 - y0) == (200, 400)


def test_model_input_is_bgr_chw_float_with_raw_values() -> None:
    img = np.zeros((100, 100, 3), np.uint8)
    img[..., 0] = 255  # blue
    out = crop_for_model(img, (30, 30, 40, 40), 1.0, 80, 80)
    assert out.shape == (3, 80, 80) and out.dtype == np.float32
    assert out[0].min() == 255.0 and out[1].max() == 0.0 and out[2].max() == 0.0
