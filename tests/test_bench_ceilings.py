"""The benchmarks' ceilings: bench-liveness's per-stage costs (every stage of a call timed, engines from the
server's factory, the bound the ratio of the two sums) and bench-identify's CPU per clip in process (each
configuration's engines as the server would choose them, the ceiling the ratio of the two)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import identify_cpu, liveness_stages
from benchmarks.baseline import baseline_toml
from benchmarks.identify import measured_toml
from engines.specs import DETECTOR, LIVENESS_SPECS
from facegate_client.client import clip_from_folder
from server.servicers.identification import clip_from_proto
from tests.conftest import ROOT, _need

pytestmark = pytest.mark.weights


def test_every_stage_is_timed_and_the_bound_is_the_ratio_of_the_sums(repository_dir: Path, samples: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    image = (samples / "image_T1.jpg").read_bytes()
    real = liveness_stages.stage_costs
    monkeypatch.setattr(liveness_stages, "stage_costs",
                        lambda repo, img, runtime: real(repo, img, runtime, calls=2, rounds=1))
    r = liveness_stages.compare(repository_dir, image, "auto")
    names = (DETECTOR, *(s.name for s in LIVENESS_SPECS))
    for side in ("baseline", "measured"):
        stages = r[side]["stages_ms"]
        assert {"header", "decode", "detector input", "detections and NMS", "crops and quality"} <= set(stages)
        assert all(f"{n} b1" in stages and f"{n} b8 per item" in stages for n in names)
        assert all(v > 0 for v in stages.values())
        engines = sum(v for k, v in stages.items() if k.endswith(" b1"))
        assert r[side]["total_b1_ms"] == pytest.approx(engines + sum(
            v for k, v in stages.items() if not k.startswith(names)))
    assert all(v.startswith("onnxruntime") for v in r["baseline"]["engines"].values())
    assert r["bound_b8"] == pytest.approx(r["baseline"]["total_b8_ms"] / r["measured"]["total_b8_ms"])
    assert "Best possible saturation ratio" in "\n".join(liveness_stages.markdown(r))


def test_cpu_per_clip_runs_each_configuration_as_the_server_would(repository_dir: Path) -> None:
    root = ROOT / ".cache" / "synthetic" / "motion" / "CASME2_RAW"
    folders = sorted(p for p in root.glob("*/*") if p.is_dir())[:2]
    if not folders or not (repository_dir / "ensembles").is_dir():
        _need("a trained identification ensemble and its synthetic clips (make identify-models)")
    clips = [clip_from_proto(clip_from_folder(p, 200.0)) for p in folders]
    r = identify_cpu.compare(repository_dir, measured_toml("auto"), baseline_toml(), clips, rounds=1)
    base, meas = r["rows"]["baseline"][0], r["rows"]["measured"][0]
    assert all(v.startswith("onnxruntime") for v in base["engines"].values())
    assert len(meas["engines"]) == len(base["engines"]) >= 2  # the detector and every member
    assert base["cpu_ms_per_clip"] > 0 and meas["cpu_ms_per_clip"] > 0 and base["clips"] == 2
    assert r["ceiling_ratio"] == pytest.approx(base["cpu_ms_per_clip"] / meas["cpu_ms_per_clip"])
    assert r["ceiling_clips_per_s"]["measured"] == pytest.approx(r["cores"] * 1e3 / meas["cpu_ms_per_clip"])
