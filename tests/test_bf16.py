"""bf16 behind the gates of every pipeline that uses a model: what the gates wrote is what is served, only on a
CPU with bf16 arithmetic, only on the machine class the gates ran on, and never for a model that does not
declare it. The gates run at model preparation (``make models``, ``make identify-models``); these tests read
their outcome from the suite's repository and check the serving side against it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import engines.machine as machine
import engines.precision as precision
from engines.batching import BatcherConfig
from engines.declarations import (
    DECLARATIONS,
    IDENTIFICATION,
    LIVENESS,
    ModelDeclaration,
    declaration_for,
)
from engines.machine import (
    GATE_RECORD,
    cpu_type,
    has_bf16,
    is_this_type,
    machine_class,
    type_of,
    usable_cpus,
    write_stamp,
)
from engines.precision import GATE_FILE, passed_bf16, verdicts_here, write_bf16_part, write_gate
from engines.repository import ModelRepository
from engines.runtime.cpu_choice import gated_pipelines
from engines.runtime.factory import EngineFactory, RuntimeSettings
from engines.specs import DETECTOR, LIVENESS_SPECS
from tests.verdicts import as_format1


def test_declarations_name_the_cpu_precisions_and_pipelines_of_each_model() -> None:
    det = DECLARATIONS[DETECTOR]
    assert det.cpu_precisions == ("fp32", "bf16") and det.pipelines == (LIVENESS, IDENTIFICATION)
    for spec in LIVENESS_SPECS:
        assert DECLARATIONS[spec.name].cpu_precisions == ("fp32", "bf16", "int8")
        assert DECLARATIONS[spec.name].pipelines == (LIVENESS,)
    with pytest.raises(ValueError, match="must include 'fp32'"):
        ModelDeclaration("m", "generic", (), (), BatcherConfig(), cpu_precisions=("bf16",))


def test_the_cpu_type_names_the_isa_and_the_stamp_changes_only_with_it(tmp_path: Path) -> None:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    assert machine_class() == f"{cpu_type()} x{usable_cpus()}" and type_of(machine_class()) == cpu_type()
    assert is_this_type(cpu_type()) and is_this_type(machine_class()) and not is_this_type("Some Other CPU x2")
    assert ("bf16" in cpu_type().split("[")[-1]) == ("avx512_bf16" in flags.split())
    stamp = tmp_path / "stamp"
    assert write_stamp(stamp) and stamp.read_text().splitlines() == [cpu_type(), f"gate record {GATE_RECORD}"]
    mtime = stamp.stat().st_mtime_ns
    assert not write_stamp(stamp) and stamp.stat().st_mtime_ns == mtime  # untouched: make re-runs nothing
    stamp.write_text(f"another CPU\ngate record {GATE_RECORD}\n")
    assert write_stamp(stamp)
    # A repository whose gates wrote the older record (INT8 verdicts without their class) has them run once more.
    stamp.write_text(f"{machine_class()}\n")
    assert write_stamp(stamp)
    # A stamp from before the types (the class, with a CPU count, any count) of this type stands: nothing re-runs.
    for count in (usable_cpus(), usable_cpus() + 62):
        stamp.write_text(f"{cpu_type()} x{count}\ngate record {GATE_RECORD}\n")
        assert not write_stamp(stamp)


def test_a_type_whose_name_ends_like_a_count_is_still_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU named "... x86" (no family or ISA fields to follow it) looks like a class with a count; it is
    compared whole first, so its own verdicts and stamp still hold."""
    monkeypatch.setattr(machine, "cpu_type", lambda: "Made-up CPU x86")
    assert is_this_type("Made-up CPU x86") and is_this_type("Made-up CPU x86 x2")
    assert not is_this_type("Made-up CPU") and not is_this_type("Made-up CPU x2")


@pytest.mark.weights
def test_gate_entries_merge_and_a_verdict_holds_only_where_it_was_measured(repository_dir: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    name = LIVENESS_SPECS[0].name
    shutil.copytree(repository_dir / name, tmp_path / name, ignore=shutil.ignore_patterns("engines"))
    (tmp_path / name / GATE_FILE).unlink(missing_ok=True)
    repo = ModelRepository(tmp_path)
    monkeypatch.setattr(precision, "has_bf16", lambda: True)  # the bookkeeping, whatever this CPU is
    assert passed_bf16(repo, name, [LIVENESS]) == (False, "bf16: no liveness gate has run for this model")
    write_bf16_part(repo, name, LIVENESS, {"passed": True, "summary": "ok"})
    write_gate(repo, name, {"passed": False, "summary": "int8 failed"})  # an INT8 verdict keeps the bf16 part
    assert passed_bf16(repo, name, [LIVENESS]) == (True, "bf16 passed its gate (liveness: ok)")
    assert verdicts_here(tmp_path / name)["int8"]["summary"] == "int8 failed"
    assert passed_bf16(repo, name, [LIVENESS, IDENTIFICATION])[1] == "bf16: no identification gate has run for " \
                                                                     "this model"
    # A file written before verdicts were kept per CPU type (format 1: one part per pipeline, naming its type): one
    # measured on another type is not this one's.
    entries = json.loads(as_format1(verdicts_here(tmp_path / name)))
    entries["bf16"]["parts"][LIVENESS]["machine"] = "Some Other CPU x2"
    (tmp_path / name / GATE_FILE).write_text(json.dumps(entries))
    assert passed_bf16(repo, name, [LIVENESS]) == (False, "bf16: the liveness gate ran on another CPU "
                                                          "(Some Other CPU x2)")
    # The same type of CPU with another CPU count (a pod with another CPU limit), or recorded with its count before
    # verdicts named the type: the verdict holds (the count never changed an output of the gated models).
    for recorded in (f"{cpu_type()} x{usable_cpus() + 62}", machine_class()):
        entries["bf16"]["parts"][LIVENESS]["machine"] = recorded
        (tmp_path / name / GATE_FILE).write_text(json.dumps(entries))
        assert passed_bf16(repo, name, [LIVENESS]) == (True, "bf16 passed its gate (liveness: ok)")
    write_bf16_part(repo, name, LIVENESS, {"passed": True, "summary": "ok"})  # written back per CPU type
    assert json.loads((tmp_path / name / GATE_FILE).read_text())["format"] == 2
    assert verdicts_here(tmp_path / name)["int8"]["summary"] == "int8 failed"
    entries = json.loads(as_format1(verdicts_here(tmp_path / name)))
    entries["bf16"]["parts"][LIVENESS]["source_onnx_sha256"] = "0" * 64
    (tmp_path / name / GATE_FILE).write_text(json.dumps(entries))
    assert passed_bf16(repo, name, [LIVENESS])[1] == "bf16: the liveness gate ran on another version of the model"
    write_bf16_part(repo, name, LIVENESS, {"passed": False, "summary": "2 of 54 verdicts changed"})
    assert passed_bf16(repo, name, [LIVENESS])[1] == "bf16 failed its liveness gate (2 of 54 verdicts changed)"
    # A CPU without bf16 arithmetic never gets it, whatever the gate said.
    write_bf16_part(repo, name, LIVENESS, {"passed": True, "summary": "ok"})
    monkeypatch.setattr(precision, "has_bf16", lambda: False)
    assert passed_bf16(repo, name, [LIVENESS]) == (False, "bf16: this CPU has no bf16 arithmetic")


@pytest.mark.weights
def test_each_cpu_type_keeps_its_own_verdicts_on_a_shared_volume(repository_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPU types writing verdicts for one model (pods of both on one volume): each finds its own current,
    whatever the other wrote since, and only verdicts about files the repository no longer has are dropped."""
    name = LIVENESS_SPECS[0].name
    shutil.copytree(repository_dir / name, tmp_path / name, ignore=shutil.ignore_patterns("engines"))
    (tmp_path / name / GATE_FILE).unlink(missing_ok=True)
    int8_file = tmp_path / name / precision.INT8_FILE
    int8_file.write_bytes((tmp_path / name / "model.onnx").read_bytes())  # an INT8 file's bytes are all the gate checks
    repo = ModelRepository(tmp_path)
    monkeypatch.setattr(precision, "has_bf16", lambda: True)

    def be(cpu: str) -> None:
        monkeypatch.setattr(machine, "cpu_type", lambda: cpu)
        monkeypatch.setattr(precision, "cpu_type", lambda: cpu)

    a, b = "CPU A (family 6 model 207) [avx512 amx]", "CPU B (family 25 model 17) [avx2]"
    be(a)
    assert not precision.int8_vouched(repo, name)  # nothing measured this file yet: a gate quantises
    write_gate(repo, name, {"passed": True, "summary": "A int8"})
    write_bf16_part(repo, name, LIVENESS, {"passed": True, "summary": "A bf16"})
    be(b)
    assert precision.passed_int8(repo, name) == (None, f"the INT8 gate ran on another CPU ({a})")
    assert not precision.verdict_is_current(repo, name, "int8")
    assert precision.int8_vouched(repo, name)  # A's verdict is about this file: B gates it as it is
    write_gate(repo, name, {"passed": False, "summary": "B int8"})
    write_bf16_part(repo, name, LIVENESS, {"passed": True, "summary": "B bf16"})
    stored = json.loads((tmp_path / name / GATE_FILE).read_text())
    assert stored["format"] == 2 and set(stored["cpu_types"]) == {a, b}
    for cpu, int8, bf16 in ((a, "INT8 passed its parity gate (A int8)", "bf16 passed its gate (liveness: A bf16)"),
                            (b, "INT8 failed its parity gate (B int8)", "bf16 passed its gate (liveness: B bf16)")):
        be(cpu)
        assert precision.passed_int8(repo, name)[1] == int8 and passed_bf16(repo, name, [LIVENESS])[1] == bf16
        assert precision.verdict_is_current(repo, name, "int8")
        assert precision.verdict_is_current(repo, name, "bf16", LIVENESS)
    # Another INT8 file: no type's INT8 verdict holds, and the next write drops them (bf16 does not rest on it).
    int8_file.write_bytes(int8_file.read_bytes() + b"\0")
    assert not precision.int8_vouched(repo, name)
    be(a)
    assert precision.passed_int8(repo, name)[1] == "the INT8 file is missing or not the one the gate passed"
    write_bf16_part(repo, name, LIVENESS, {"passed": False, "summary": "A bf16 again"})
    assert {t: set(v) for t, v in precision.stored_verdicts(tmp_path / name).items()} == {a: {"bf16"}, b: {"bf16"}}
    # A type's verdicts for an FP32 model the repository no longer has are dropped on the next write.
    stored = json.loads((tmp_path / name / GATE_FILE).read_text())
    stored["cpu_types"][b]["bf16"]["parts"][LIVENESS]["source_onnx_sha256"] = "0" * 64
    (tmp_path / name / GATE_FILE).write_text(json.dumps(stored))
    write_gate(repo, name, {"passed": True, "summary": "A int8 again"})
    assert set(precision.stored_verdicts(tmp_path / name)) == {a}
    # A gate whose FP32 model was replaced while it ran (another process on the volume) records nothing.
    assert not write_gate(repo, name, {"passed": False, "summary": "measured on another model"}, measured="0" * 64)
    assert not write_bf16_part(repo, name, LIVENESS, {"passed": True, "summary": "likewise"}, measured="0" * 64)
    assert verdicts_here(tmp_path / name)["int8"]["summary"] == "A int8 again"
    assert verdicts_here(tmp_path / name)["bf16"]["parts"][LIVENESS]["summary"] == "A bf16 again"


@pytest.mark.weights
def test_a_verdict_file_that_cannot_be_read_gives_no_verdicts_and_is_written_afresh(repository_dir: Path,
                                                                                     tmp_path: Path) -> None:
    """A hand-edited or damaged precision.json: its model serves FP32 (the server still starts), and the next gate
    writes the file afresh."""
    name = LIVENESS_SPECS[0].name
    shutil.copytree(repository_dir / name, tmp_path / name, ignore=shutil.ignore_patterns("engines"))
    repo, path = ModelRepository(tmp_path), tmp_path / name / GATE_FILE
    for broken in ('{"format": 2, "cpu_types": {"x": 5}', "[1, 2]", '{"int8": "yes", "bf16": [1]}',
                   json.dumps({"format": 2, "cpu_types": {cpu_type(): {"int8": 3, "bf16": {"parts": [1]}}}}),
                   json.dumps({"format": 2, "cpu_types": [cpu_type()]})):
        path.write_text(broken)
        assert precision.passed_int8(repo, name) == (None, "no INT8 gate has run for this model"), broken
        assert not precision.verdict_is_current(repo, name, "bf16", LIVENESS)
    write_gate(repo, name, {"passed": False, "summary": "written afresh"})
    assert verdicts_here(tmp_path / name)["int8"]["summary"] == "written afresh"


def _parts(repository_dir: Path, name: str) -> dict[str, dict[str, object]]:
    path = repository_dir / name / GATE_FILE
    parts = verdicts_here(path.parent).get("bf16", {}).get("parts", {}) if path.is_file() else {}
    if not parts:
        pytest.skip(f"no bf16 gate has run for {name} (a CPU without bf16 arithmetic: {not has_bf16()})")
    return parts


@pytest.mark.weights
def test_every_bf16_part_records_its_numbers_and_its_verdict_follows_them(repository_dir: Path) -> None:
    repo = ModelRepository(repository_dir)
    for name in repo.names():
        decl = declaration_for(repo.load(name))
        if "bf16" not in decl.cpu_precisions:
            continue
        for pipeline, part in _parts(repository_dir, name).items():
            assert pipeline in decl.pipelines and is_this_type(str(part["machine"]))
            if pipeline == LIVENESS and "verdicts_changed" in part:
                assert part["parity_images"] >= 50  # type: ignore[operator]
                assert part["passed"] == (part["verdicts_changed"] == 0 and part["max_score_gap"] <= 0.02)  # type: ignore[operator]
            elif pipeline == IDENTIFICATION and "min_cosine" in part and name != DETECTOR:
                assert part["parity_clips"] >= 50  # type: ignore[operator]
                if part["passed"]:
                    assert part["min_cosine"] >= 0.99 and part["rank1_bf16"] == part["rank1_fp32"]  # type: ignore[operator]
                assert "synthetic" in str(part["data"])


@pytest.mark.weights
def test_bf16_is_served_only_where_every_pipeline_gate_passed(repository_dir: Path) -> None:
    repo = ModelRepository(repository_dir)
    factory = EngineFactory(repo, RuntimeSettings(prefer_gpu=False))
    for name in repo.names():
        decl = declaration_for(repo.load(name))
        ok, why = passed_bf16(repo, name, gated_pipelines(repo, decl))
        model, reason = factory.create(decl, decl.batching)
        if model.runtime.endswith(":bf16"):
            assert ok and "bf16" in decl.cpu_precisions and has_bf16(), (name, reason)
        assert why in reason or "not declared" in reason, reason
    # And a setting turns it off even where it passed.
    off = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, bf16=False))
    for name in repo.names():
        decl = declaration_for(repo.load(name))
        model, reason = off.create(decl, decl.batching)
        assert not model.runtime.endswith(":bf16") and ("bf16 not allowed" in reason or "only CPU" in reason)


@pytest.mark.weights
def test_the_detector_needs_the_identification_part_where_an_ensemble_is_served(repository_dir: Path,
                                                                                tmp_path: Path) -> None:
    repo = ModelRepository(repository_dir)
    decl = DECLARATIONS[DETECTOR]
    assert gated_pipelines(repo, decl) == ((LIVENESS, IDENTIFICATION) if (repository_dir / "ensembles").is_dir()
                                           else (LIVENESS,))
    shutil.copytree(repository_dir / DETECTOR, tmp_path / DETECTOR, ignore=shutil.ignore_patterns("engines"))
    assert gated_pipelines(ModelRepository(tmp_path), decl) == (LIVENESS,)  # no ensemble: liveness only


@pytest.mark.weights
@pytest.mark.skipif(not has_bf16(), reason="this CPU has no bf16 arithmetic (OpenVINO lists no BF16)")
def test_a_bf16_classifier_stays_within_the_gate_of_fp32_on_a_sample_face(repository_dir: Path,
                                                                          samples: Path) -> None:
    import cv2

    from engines.identify.preprocess import OnnxDetector
    from engines.runtime.openvino_engine import OpenVinoModel
    from engines.vision.crop import crop_for_model
    from engines.vision.liveness_decision import softmax

    repo = ModelRepository(repository_dir)
    img = cv2.imread(str(samples / "image_T1.jpg"))
    assert img is not None
    box = OnnxDetector(repo.onnx_path(DETECTOR)).best_box(img, 0.6)
    assert box is not None
    for spec in LIVENESS_SPECS:
        x = crop_for_model(img, box, spec.scale, spec.width, spec.height)[None]
        meta = repo.load(spec.name)
        probs = [softmax(OpenVinoModel(repo.onnx_path(spec.name), meta, precision=p).new_instance()
                         .infer({"input": x})[0]["logits"][0].astype(np.float64))[spec.live_class]
                 for p in ("fp32", "bf16")]
        assert abs(probs[0] - probs[1]) <= 0.02, (spec.name, probs)
        compiled = OpenVinoModel(repo.onnx_path(spec.name), meta, precision="bf16")._compiled
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    fp32 = OpenVinoModel(repo.onnx_path(LIVENESS_SPECS[0].name), repo.load(LIVENESS_SPECS[0].name))._compiled
    # Explicitly FP32: on a CPU with bf16, OpenVINO's own default inference precision is bf16.
    assert str(fp32.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
