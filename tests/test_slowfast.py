"""SlowFast: configuration checks, the published cost figures, shapes, and ONNX equality."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.models.slowfast import PRESETS, SlowFast, SlowFastConfig, count_macs  # noqa: E402


def test_invalid_configs_name_the_values() -> None:
    with pytest.raises(ValueError, match=r"clip_len \(18\) must be divisible by alpha \(4\)"):
        SlowFastConfig(clip_len=18, alpha=4)
    with pytest.raises(ValueError, match="beta_inv"):
        SlowFastConfig(width=20, beta_inv=8)


def test_cost_matches_the_published_figures() -> None:
    # R50, T=64, alpha 4, beta 1/8, 128 px: 32.7 G multiply-adds; the CI-size model about 0.12 G (without the
    # residual input channels our CPU preset adds, which cost about 0.06 G more).
    assert count_macs(PRESETS["gpu"]) / 1e9 == pytest.approx(32.7, abs=0.1)
    assert count_macs(replace(PRESETS["cpu"], residual_input=False)) / 1e9 == pytest.approx(0.12, abs=0.02)
    assert count_macs(PRESETS["cpu"]) / 1e9 < 0.2
    assert SlowFast(PRESETS["gpu"]).feature_dim == 2048 + 256


@pytest.mark.parametrize("cfg", [
    SlowFastConfig(clip_len=8, alpha=2, beta_inv=4, width=8, depth=(1, 1, 1, 1), size=48, embed_dim=16),
    SlowFastConfig(clip_len=16, alpha=8, beta_inv=8, width=16, depth=(1, 2, 1, 1), fusion_kernel=7, size=40,
                   embed_dim=8, residual_input=True),
])
def test_embeddings_are_normalised_for_any_size(cfg: SlowFastConfig) -> None:
    model = SlowFast(cfg, num_classes=5).eval()
    with torch.no_grad():
        e = model(torch.rand(3, 3, cfg.clip_len, cfg.size, cfg.size) * 255)
        logits = model.logits(e, torch.tensor([0, 1, 2]))
    assert e.shape == (3, cfg.embed_dim) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert logits.shape == (3, 5)


def test_onnx_export_equals_torch_with_a_dynamic_batch(tmp_path: Path) -> None:
    from engines.export import export_onnx, verify_onnx

    cfg = PRESETS["cpu"]
    model = SlowFast(cfg).eval()
    path = tmp_path / "sf.onnx"
    export_onnx(model, torch.rand(2, 3, cfg.clip_len, cfg.size, cfg.size) * 255, path, "clip", ["embedding"])
    sample = np.zeros((3, cfg.clip_len, cfg.size, cfg.size), np.float32)
    sample.flat[1] = 255
    assert verify_onnx(model, path, sample, batch_sizes=(1, 4)).max_abs_diff <= 1e-4
