"""``make bench-soak``: the growth fit, and a short run of the whole mix against a real server, in which every
call must get a status its kind allows (or the documented shedding) and every answer must equal the first one
for the same input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import soak
from benchmarks.soak_report import markdown, slope, summarize_samples
from tests.test_server_auth import SYNTH


def _sample(t_s: float, calls: int, rss_mib: float) -> dict[str, float]:
    return {"t_s": t_s, "calls": calls, "rss": rss_mib * 2**20, "threads": 100, "fds": 40, "audit_bytes": 0}


def test_growth_is_fitted_after_the_warmup_per_minute_and_per_calls() -> None:
    # A start-up climb of 500 MiB in the first minute, then 2 MiB a minute at 1,000 calls a minute.
    samples = [_sample(t, t * 1000 // 60, 500 + t * 500 / 60) for t in range(0, 61, 10)]
    samples += [_sample(t, t * 1000 // 60, 1000 + 2 * (t - 60) / 60) for t in range(70, 601, 10)]
    g = summarize_samples(samples, warmup=0.25)
    assert g["rss"]["from_s"] == 150
    assert g["rss"]["per_minute"] == pytest.approx(2.0, rel=1e-6)
    assert g["rss"]["per_10k_calls"] == pytest.approx(20.0, rel=1e-2)
    assert g["rss"]["floor_per_minute"] == pytest.approx(2.0, rel=1e-6)
    assert g["threads"]["per_minute"] == pytest.approx(0.0, abs=1e-9) and g["fds"]["max"] == 40
    # Without the warm-up cut, the start-up climb dominates the fit.
    assert summarize_samples(samples, warmup=0.0)["rss"]["per_minute"] > 10
    # Swings of +300 MiB on every other sample move the fit of all samples but not that of each minute's lowest.
    swung = [{**s, "rss": s["rss"] + (300 * 2**20 if i % 2 else 0)} for i, s in enumerate(samples)]
    g = summarize_samples(swung, warmup=0.25)
    assert g["rss"]["floor_per_minute"] == pytest.approx(2.0, rel=0.05)
    # A last minute cut short, whose one sample came with big requests in flight, is left out of the floor fit.
    cut = [*swung[:-1], {**samples[-1], "t_s": 605, "rss": samples[-1]["rss"] + 400 * 2**20}]
    assert summarize_samples(cut, warmup=0.25)["rss"]["floor_per_minute"] == pytest.approx(2.0, rel=0.05)
    assert slope([1.0], [2.0]) == 0.0 and slope([1.0, 1.0], [2.0, 3.0]) == 0.0


@pytest.mark.weights
@pytest.mark.slow
def test_a_short_soak_answers_every_call_as_its_kind_allows(repository_dir: Path, samples: Path,
                                                            tmp_path: Path) -> None:
    if not SYNTH.is_dir():
        pytest.fail(f"the synthetic clips are missing in {SYNTH} (make identify-models)")
    assert soak.main(["--repository", str(repository_dir), "--synthetic", str(SYNTH), "--images",
                      *map(str, sorted(samples.glob("*.jpg"))), "--out", str(tmp_path), "--duration", "20",
                      "--sample-s", "2", "--concurrency", "6"]) == 0
    r = json.loads((tmp_path / "soak.json").read_text())
    assert r["unexpected_calls"] == 0, r["unexpected"]
    assert r["wrong_answers"] == 0 and r["answers_after"]
    seen = {key.rsplit(" ", 1)[0] for key in r["by_kind"]}
    assert seen == set(soak.MIX), f"kinds never sent: {set(soak.MIX) - seen}"
    # Each refusal the mix is there to exercise was given at least once.
    for key in ("no_credential UNAUTHENTICATED", "out_of_scope PERMISSION_DENIED",
                "past_deadline DEADLINE_EXCEEDED", "bad_input INVALID_ARGUMENT", "liveness OK", "identify OK"):
        assert r["by_kind"].get(key, 0) > 0, key
    assert len(r["samples"]) >= 5 and all(s["rss"] > 0 and s["threads"] > 0 for s in r["samples"])
    assert r["growth"]["rss"]["samples"] >= 3
    # The server's C heap, read from its metrics at each sample: the models alone hold more than 100 MiB.
    assert all(s["heap_in_use"] > 100 * 2**20 and s["heap_free"] >= 0 for s in r["samples"])
    assert r["growth"]["heap_in_use"]["samples"] == r["growth"]["rss"]["samples"]
    assert "| C heap in use (server process), MiB |" in markdown(r)
    assert "| resident memory, MiB |" in markdown(r)
    # Where the server ran in a control group of its own (as root: CI), that group's working set, which the
    # memory alerts read: the server's models and more, and within a few hundred MiB of the resident memory.
    if "working_set" in r["samples"][0]:
        assert all(100 * 2**20 < s["working_set"] < s["rss"] + 512 * 2**20 for s in r["samples"])
        assert "| working set of the server's control group, MiB |" in markdown(r)
