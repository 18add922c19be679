"""OpenVINO beside ONNX Runtime: FP32 parity on every served model, and ``auto`` choosing per model by
measurement, with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.declarations import OPENVINO, declaration_for
from engines.repository import ModelRepository
from engines.runtime.cpu_choice import CHOICE_FILE, choose_cpu_runtime, decide, overall
from engines.runtime.factory import EngineFactory, RuntimeSettings
from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
from engines.runtime.openvino_engine import OpenVinoModel
from tests.conftest import run_together

pytestmark = pytest.mark.weights


def test_openvino_equals_onnxruntime_on_every_model(repository_dir: Path) -> None:
    repo = ModelRepository(repository_dir)
    rng = np.random.default_rng(0)
    assert len(repo.names()) >= 6  # detector, two classifiers, the SlowFast members
    for name in repo.names():
        meta = repo.load(name)
        item = declaration_for(meta).warmup_item()
        model = OpenVinoModel(repo.onnx_path(name), meta)
        # Unpinned: pinned, OpenVINO put every model's thread on the same core, serialising models run in parallel.
        assert model._compiled.get_property("ENABLE_CPU_PINNING") is False
        ov = model.new_instance()
        ort = OnnxRuntimeModel(repo.onnx_path(name), meta, ["CPUExecutionProvider"]).new_instance()
        for batch in (1, 3):
            x = {k: rng.uniform(0, 255, (batch, *v.shape)).astype(v.dtype) for k, v in item.items()}
            a, _ = ov.infer(x)
            b, _ = ort.infer(x)
            for k in b:
                assert a[k].shape == b[k].shape
                assert float(np.abs(a[k] - b[k]).max()) <= 1e-4, (name, k)


def test_auto_measures_once_per_machine_class_and_says_why(repository_dir: Path, tmp_path: Path) -> None:
    import shutil

    repo = ModelRepository(tmp_path)
    shutil.copytree(repository_dir / "minifasnet_v2", tmp_path / "minifasnet_v2",
                    ignore=shutil.ignore_patterns("engines", CHOICE_FILE))
    decl = declaration_for(repo.load("minifasnet_v2"))
    runtime, why = choose_cpu_runtime(repo, decl, 1)
    assert (tmp_path / "minifasnet_v2" / CHOICE_FILE).is_file()
    assert "items/s at batch 1 / 8" in why and why.startswith(runtime)
    assert choose_cpu_runtime(repo, decl, 1) == (runtime, why)  # read back, not measured again
    engine, reason = EngineFactory(repo, RuntimeSettings(prefer_gpu=False)).create(decl, decl.batching)
    # "openvino-bf16" is served as "openvino:<version>:CPU:bf16", "openvino" as "...:fp32".
    family, _, precision = runtime.partition("-")
    assert engine.runtime.startswith(family) and engine.runtime.endswith(precision or "") and "auto" in reason
    forced, reason = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO)).create(
        decl, decl.batching)
    assert forced.runtime.startswith("openvino") and "configured" in reason
    with pytest.raises(ValueError, match="must be one of"):
        RuntimeSettings(models={"minifasnet_v2": "tpu"})


_CHOOSE = """
import json, sys
from pathlib import Path
from engines.declarations import declaration_for
from engines.repository import ModelRepository
from engines.runtime.cpu_choice import choose_cpu_runtime
repo = ModelRepository(Path(sys.argv[1]))
print(json.dumps(choose_cpu_runtime(repo, declaration_for(repo.load("minifasnet_v2")), 1)))
"""


def test_processes_starting_together_measure_once_and_serve_the_same_choice(repository_dir: Path,
                                                                            tmp_path: Path) -> None:
    """Workers (--workers) or replicas starting on one repository: one measures while the others wait for its
    entry, so all serve the same runtime and precision. Measured separately, two processes' readings differ
    (the reason carries them) and their choices could too."""
    import json
    import shutil

    shutil.copytree(repository_dir / "minifasnet_v2", tmp_path / "minifasnet_v2",
                    ignore=shutil.ignore_patterns("engines", CHOICE_FILE, "openvino-cache"))
    answers = [json.loads(out) for out in run_together(_CHOOSE, str(tmp_path))]
    assert answers[0] == answers[1] and "items/s at batch 1 / 8" in answers[0][1]
    assert len(json.loads((tmp_path / "minifasnet_v2" / CHOICE_FILE).read_text())) == 1
    assert not [p.name for p in (tmp_path / "minifasnet_v2").iterdir() if p.name.endswith(".tmp")]


def test_a_repository_that_cannot_keep_the_measurements_only_costs_measuring_again(
        repository_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging
    import shutil

    shutil.copytree(repository_dir / "minifasnet_v2", tmp_path / "minifasnet_v2",
                    ignore=shutil.ignore_patterns("engines", CHOICE_FILE, "openvino-cache"))
    (tmp_path / "minifasnet_v2" / CHOICE_FILE).mkdir()  # the file cannot be replaced (root may write anywhere)
    repo = ModelRepository(tmp_path)
    with caplog.at_level(logging.WARNING, logger="engines.runtime.cpu_choice"):
        runtime, why = choose_cpu_runtime(repo, declaration_for(repo.load("minifasnet_v2")), 1)
    assert why.startswith(runtime) and "items/s at batch 1 / 8" in why
    assert "minifasnet_v2: auto's measurements are not kept" in caplog.text
    assert not [p.name for p in (tmp_path / "minifasnet_v2").iterdir() if p.name.endswith(".tmp")]
    # A file that cannot be read is a cache miss too: measured again, and replaced by a whole one.
    (tmp_path / "minifasnet_v2" / CHOICE_FILE).rmdir()
    (tmp_path / "minifasnet_v2" / CHOICE_FILE).write_text('{"half a')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engines.runtime.cpu_choice"):
        again, why = choose_cpu_runtime(repo, declaration_for(repo.load("minifasnet_v2")), 1)
    assert f"minifasnet_v2: cannot read {CHOICE_FILE}" in caplog.text and why.startswith(again)
    assert len(json.loads((tmp_path / "minifasnet_v2" / CHOICE_FILE).read_text())) == 1


def test_auto_weighs_batch_one_as_much_as_the_largest_batch() -> None:
    # RetinaFace on an AMX Xeon: OpenVINO FP32 measured 1.16x ONNX Runtime at batch 8 and 0.80x at batch 1, where
    # a lightly loaded server runs; judged on batch 8 alone it was served and made detection slower.
    assert decide({"onnxruntime": {"1": 499, "8": 467}, "openvino": {"1": 415, "8": 544}}) == "onnxruntime"
    # Clearly faster at both sizes wins; a few per cent is noise and the incumbent stays.
    assert decide({"onnxruntime": {"1": 419, "8": 437}, "openvino-bf16": {"1": 1070, "8": 2200}}) == "openvino-bf16"
    assert decide({"onnxruntime": {"1": 400, "8": 400}, "openvino": {"1": 430, "8": 430}}) == "onnxruntime"
    assert decide({"onnxruntime": {"1": 100}, "openvino": {"1": 200}}) == "openvino"
    assert decide({}) == "onnxruntime"


def test_auto_serves_reduced_precision_only_when_it_beats_the_more_exact_by_the_margin() -> None:
    # As with the SlowFast members on the Zen 1 EPYC (where INT8 and OpenVINO FP32 measured within a few per cent
    # and either could read higher on a start): INT8 reading 6 % above OpenVINO FP32 is not served, FP32 is.
    zen1: dict[str, dict[str, float]] = {
        "onnxruntime": {"1": 40, "8": 38}, "openvino": {"1": 97, "8": 115}, "openvino-int8": {"1": 104, "8": 121}}
    assert decide(zen1) == "openvino"
    # Clearly faster than the faster FP32 candidate: served (the members' bf16 on an AMX Xeon).
    assert decide({"onnxruntime": {"1": 410, "8": 580}, "openvino": {"1": 430, "8": 600},
                   "openvino-bf16": {"1": 515, "8": 825}}) == "openvino-bf16"
    # OpenVINO FP32 not clearly ahead of ONNX Runtime, so ONNX Runtime serves, but the variant must still beat
    # OpenVINO FP32 by the margin: 1.15x ONNX Runtime is only 1.05x OpenVINO FP32.
    assert decide({"onnxruntime": {"1": 100}, "openvino": {"1": 109.5}, "openvino-int8": {"1": 115}}) == "onnxruntime"
    assert decide({"onnxruntime": {"1": 100}, "openvino": {"1": 109.5}, "openvino-int8": {"1": 121}}) == "openvino-int8"
    # Of two variants that both clear the margin, the faster.
    both: dict[str, dict[str, float]] = {
        "onnxruntime": {"1": 100}, "openvino-int8": {"1": 150}, "openvino-bf16": {"1": 170}}
    assert decide(both) == "openvino-bf16"
    # bf16 over INT8 the same way: one member's readings on an AMX Xeon (2026-12-05), where INT8 read 1.07x bf16
    # (whose batch-8 figure came from a slow stretch: 1012-1069 for the other members) and was served.
    amx: dict[str, dict[str, float]] = {"onnxruntime": {"1": 123, "8": 136}, "openvino": {"1": 346, "8": 334},
                                        "openvino-bf16": {"1": 663, "8": 771}, "openvino-int8": {"1": 630, "8": 931}}
    assert decide(amx) == "openvino-bf16"
    amx["openvino-int8"] = {"1": 800, "8": 931}  # 1.21x bf16: clearly faster, served
    assert decide(amx) == "openvino-int8"
    # A runtime that could not load the model is absent: the variant is judged against what did load.
    assert decide({"openvino": {"1": 100}, "openvino-int8": {"1": 105}}) == "openvino"
    assert overall({"1": 100, "8": 400}) == pytest.approx(200)


def test_an_ensemble_larger_than_the_cores_gets_a_thread_per_core(repository_dir: Path, tmp_path: Path) -> None:
    import shutil

    from engines.runtime.factory import engine_threads

    assert engine_threads(1, group=3, cores=2) == 2  # 3 members on 2 cores: each shares both cores
    assert engine_threads(1, group=3, cores=4) == 1  # each member has a core of its own
    assert engine_threads(1, group=1, cores=2) == 1 and engine_threads(3, group=3, cores=2) == 3
    with pytest.raises(ValueError, match="group_threads"):
        RuntimeSettings(group_threads=-1)
    member = next(n for n in ModelRepository(repository_dir).names() if n.startswith("slowfast"))
    shutil.copytree(repository_dir / member, tmp_path / member, ignore=shutil.ignore_patterns("engines", CHOICE_FILE))
    repo = ModelRepository(tmp_path)
    decl = declaration_for(repo.load(member))
    for settings, group, want in ((RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO), 3,
                                   engine_threads(1, group=3)),
                                  (RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO, group_threads=1), 3, 1),
                                  (RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO), 1, 1)):
        engine, _ = EngineFactory(repo, settings).create(decl, decl.batching, group)
        assert isinstance(engine, OpenVinoModel)
        assert engine._compiled.get_property("INFERENCE_NUM_THREADS") == want


def test_each_instance_gets_its_own_stream(repository_dir: Path) -> None:
    """The CPU plugin runs one request at a time per stream, so a model served with N instances is compiled with N
    streams (and N times the threads, which the plugin shares among them): with one stream, RetinaFace's two
    instances took turns."""
    from dataclasses import replace

    from engines.runtime.openvino_engine import cpu_config

    assert cpu_config(1, streams=2)["NUM_STREAMS"] == 2 and cpu_config(1, streams=2)["INFERENCE_NUM_THREADS"] == 2
    assert cpu_config(2)["NUM_STREAMS"] == 1 and cpu_config(2)["INFERENCE_NUM_THREADS"] == 2
    repo = ModelRepository(repository_dir)
    decl = declaration_for(repo.load("retinaface"))
    factory = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO))
    for instances in (1, 2):
        engine, _ = factory.create(decl, replace(decl.batching, instances=instances))
        assert isinstance(engine, OpenVinoModel)
        compiled = engine._compiled
        assert (compiled.get_property("NUM_STREAMS"), compiled.get_property("INFERENCE_NUM_THREADS")) == \
            (instances, instances)


def test_fixed_batch_sizes_run_on_static_models_with_the_same_outputs(repository_dir: Path) -> None:
    """Batch sizes up to ``openvino_static_batches`` run on models compiled for exactly that size (faster: no shape
    inference or reallocation per call); their outputs equal the dynamic model's, and larger batches still run on it.
    A model with another dynamic axis (the detector's height and width) gets no static models."""
    from dataclasses import replace

    repo = ModelRepository(repository_dir)
    meta = repo.load("minifasnet_v2")
    decl = declaration_for(meta)
    factory = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO, openvino_static_batches=3))
    engine, _ = factory.create(decl, replace(decl.batching, max_batch_size=8))
    assert isinstance(engine, OpenVinoModel) and engine.static_batches == (1, 2, 3)
    dynamic = OpenVinoModel(repo.onnx_path("minifasnet_v2"), meta).new_instance()
    assert OpenVinoModel(repo.onnx_path("minifasnet_v2"), meta).static_batches == ()
    served = engine.new_instance()
    item = decl.warmup_item()
    rng = np.random.default_rng(1)
    for batch in (1, 2, 3, 5):
        x = {k: rng.uniform(0, 255, (batch, *v.shape)).astype(v.dtype) for k, v in item.items()}
        a, _ = served.infer(x)
        b, _ = dynamic.infer(x)
        assert set(a) == set(b)
        for k in b:
            assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), (batch, k)
    small = factory.create(decl, replace(decl.batching, max_batch_size=2))[0]
    assert isinstance(small, OpenVinoModel) and small.static_batches == (1, 2)  # never above the largest batch
    off = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO, openvino_static_batches=0))
    dynamic_only = off.create(decl, decl.batching)[0]
    assert isinstance(dynamic_only, OpenVinoModel) and dynamic_only.static_batches == ()
    detector = factory.create(declaration_for(repo.load("retinaface")), decl.batching)[0]
    assert isinstance(detector, OpenVinoModel) and detector.static_batches == ()
    with pytest.raises(ValueError, match="openvino_static_batches"):
        RuntimeSettings(openvino_static_batches=-1)
