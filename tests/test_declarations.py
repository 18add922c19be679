"""One declaration per model: what the exporter, the server and the engine builders read."""

from __future__ import annotations

import numpy as np

from engines.declarations import DECLARATIONS, SLOWFAST_KIND, declaration_for, slowfast_member
from engines.repository import ModelMetadata, TensorMeta
from engines.specs import DETECTOR, DETECTOR_SPEC, LIVENESS_SPECS
from engines.tensorrt.build import EngineRequest, profile_for
from engines.tensorrt.profiles import fits
from server.config import ServerConfig


def test_every_served_model_is_declared_once() -> None:
    assert set(DECLARATIONS) == {DETECTOR, *(s.name for s in LIVENESS_SPECS)}


def test_detector_bounds_come_from_its_spec_and_feed_the_profile() -> None:
    decl = DECLARATIONS[DETECTOR]
    assert decl.input_bounds("input") == DETECTOR_SPEC.dynamic_axes()
    assert decl.warmup_item()["input"].shape == (3, *DETECTOR_SPEC.export_size)
    profile = profile_for(decl, EngineRequest(DETECTOR, 16))
    assert profile.inputs[0].min == (1, 3, 32, 32) and profile.inputs[0].max == (16, 3, 640, 640)
    assert fits(profile, {"input": (16, 3, 221, 166)}) and not fits(profile, {"input": (1, 3, 16, 16)})


def test_slowfast_members_are_recognised_by_the_kind_their_metadata_records() -> None:
    decl = slowfast_member("anything_at_all", 16, 64, 128)
    meta = ModelMetadata("anything_at_all", "1", decl.inputs, decl.outputs, "x", preprocessing={"kind": decl.kind})
    got = declaration_for(meta)
    assert got.kind == SLOWFAST_KIND and got.batching.max_batch_size == 8
    assert got.warmup_item()["clip"].shape == (3, 16, 64, 64)
    assert got.warmup_batch(3)["clip"].shape == (3, 3, 16, 64, 64)


def test_unknown_models_get_a_generic_declaration_from_their_metadata() -> None:
    meta = ModelMetadata("m", "1", (TensorMeta("x", "float32", (-1, 2, -1)),), (TensorMeta("y", "float32", (-1,)),),
                         "x")
    decl = declaration_for(meta)
    assert decl.kind == "generic" and decl.warmup_item()["x"].dtype == np.float32
    assert decl.warmup_item()["x"].shape == (2, 1)


def test_server_config_falls_back_to_declared_batching_and_overrides_win() -> None:
    from engines.batching import BatcherConfig

    cfg = ServerConfig(batching={DETECTOR: BatcherConfig(max_batch_size=4)})
    assert cfg.batcher_for(DETECTOR).max_batch_size == 4
    assert cfg.batcher_for(LIVENESS_SPECS[0].name) == DECLARATIONS[LIVENESS_SPECS[0].name].batching
