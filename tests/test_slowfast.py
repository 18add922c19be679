"""SlowFast: configuration checks, the published cost figures, shapes, and ONNX equality."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.models.slowfast import (  # noqa: E402
    PRESETS,
    SlowFast,
    SlowFastConfig,
    TimeFoldedConv3d,
    count_macs,
    fold_width,
)


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
    """What training exports (the inference form, fast stem time-folded) against the trained model itself; the
    multiply-adds counted from the graph are the model's own, not the folded zeros."""
    from benchmarks.cpu_engines import macs_per_item
    from engines.export import export_onnx, verify_onnx

    cfg = PRESETS["cpu"]
    torch.manual_seed(0)
    model = SlowFast(cfg).eval()
    _randomise_batch_norms(model)
    served = model.for_inference()
    assert isinstance(served.fast_stem[0], TimeFoldedConv3d) and served.fast_stem[0].fold == 4
    path = tmp_path / "sf.onnx"
    export_onnx(served, torch.rand(2, 3, cfg.clip_len, cfg.size, cfg.size) * 255, path, "clip", ["embedding"])
    sample = np.zeros((3, cfg.clip_len, cfg.size, cfg.size), np.float32)
    sample.flat[1] = 255
    assert verify_onnx(model, path, sample, batch_sizes=(1, 4)).max_abs_diff <= 1e-4
    assert macs_per_item(path, {"clip": (3, cfg.clip_len, cfg.size, cfg.size)}) == count_macs(cfg)


def _randomise_batch_norms(model: SlowFast) -> None:
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) * 2 - 1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize(("frames", "kernel", "padding", "fold"), [(16, 5, 2, 4), (16, 5, 2, 2), (8, 3, 1, 8),
                                                                    (12, 3, 0, 2)])
def test_a_time_folded_convolution_computes_the_same(frames: int, kernel: int, padding: int, fold: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 4, (kernel, 7, 7), stride=(1, 2, 2), padding=(padding, 3, 3), bias=False).eval()
    folded = TimeFoldedConv3d(conv, frames, fold)
    assert folded.weight.shape == (4 * fold, 6, kernel + fold - 1, 7, 7)
    for batch in (1, 3):
        x = torch.rand(batch, 6, frames, 40, 40)
        with torch.no_grad():
            assert torch.allclose(folded(x), conv(x), atol=1e-5)


def test_folding_is_refused_where_it_would_not_be_the_same() -> None:
    conv = torch.nn.Conv3d(6, 4, (5, 7, 7), padding=(2, 3, 3), bias=False)
    with pytest.raises(ValueError, match="do not split"):
        TimeFoldedConv3d(conv, 18, 4)  # 18 output frames
    with pytest.raises(ValueError, match="temporal stride"):
        TimeFoldedConv3d(torch.nn.Conv3d(6, 4, (5, 7, 7), stride=(2, 1, 1), bias=False), 16, 2)
    with pytest.raises(ValueError, match="bias-free"):
        TimeFoldedConv3d(torch.nn.Conv3d(6, 4, 3), 16, 2)
    # 16 lanes: 4 channels fold 4x, 8 fold 2x, 16 and more not at all; the fold must divide the frames.
    assert (fold_width(4, 16), fold_width(8, 64), fold_width(16, 16), fold_width(4, 18), fold_width(4, 9)) == \
        (4, 2, 1, 2, 1)
