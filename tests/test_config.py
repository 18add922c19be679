"""Server configuration: TOML loading, overrides and cross-field validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ServerConfig, load_config


def test_toml_sections_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "facegate.toml"
    path.write_text(
        "[server]\nport = 6000\n"
        "[liveness]\nthreshold = 0.7\n[liveness.image]\nmax_pixels = 1000000\n"
        "[batching.minifasnet_v2]\nmax_batch_size = 8\npreferred_batch_sizes = [4, 8]\n"
    )
    cfg = load_config(path, port=7000)
    assert cfg.port == 7000
    assert cfg.liveness.threshold == 0.7 and cfg.liveness.image.max_pixels == 1_000_000
    b = cfg.batcher_for("minifasnet_v2")
    assert b.max_batch_size == 8 and b.preferred_batch_sizes == (4, 8)
    assert cfg.batcher_for("retinaface").max_batch_size == 16  # untouched default


def test_unknown_setting_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[liveness]\ntreshold = 0.7\n")
    with pytest.raises(ValueError, match=r"\[liveness\]: unknown setting\(s\) \['treshold'\]"):
        load_config(path)


@pytest.mark.parametrize("text, named", [
    ("max_queue_wait_s = 0.1\n[server]\nport = 1\n", "max_queue_wait_s"),  # above every section header
    ("[sever]\nport = 1\n", "sever"),  # a misspelt section
])
def test_a_setting_outside_the_known_sections_is_refused(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "stray.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"\['{named}'\] outside the known sections"):
        load_config(path)


@pytest.mark.parametrize("section, setting, message", [
    ("server", 'clip_reduced_decode = "yes"', "clip_reduced_decode must be bool, got 'yes'"),
    ("server", 'compute_nice = "19"', "compute_nice must be int, got '19'"),
    ("server", "port = true", "port must be int, got True"),
    ("runtime", 'int8 = "maybe"', "int8 must be bool, got 'maybe'"),
    ("liveness", 'threshold = "0.5"', "threshold must be float, got '0.5'"),
])
def test_a_setting_of_the_wrong_type_is_refused_by_name(tmp_path: Path, section: str, setting: str,
                                                        message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[{section}]\n{setting}\n")
    with pytest.raises(ValueError, match=message):
        load_config(cfg)


def test_an_integer_is_a_valid_float_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nmax_queue_wait_s = 1\n")
    assert load_config(cfg).max_queue_wait_s == 1


def test_cross_field_check_names_both_values() -> None:
    from engines.vision.imaging import ImageLimits
    from server.pipelines.liveness import LivenessConfig

    with pytest.raises(ValueError, match=r"max_message_bytes \(1000\).*max_bytes \(8388608\)"):
        ServerConfig(max_message_bytes=1000, liveness=LivenessConfig(image=ImageLimits()))


def test_no_batching_turns_every_model_to_batch_one() -> None:
    cfg = ServerConfig(batching_enabled=False)
    assert cfg.batcher_for("retinaface").max_batch_size == 1
    assert cfg.batcher_for("retinaface").max_queue_delay_us == 0


def test_health_and_streams_must_leave_the_calls_their_rpc_slots() -> None:
    with pytest.raises(ValueError, match=r"max_health_and_stream_calls \(300\).*max_inflight_calls \(256\).*\(512\)"):
        ServerConfig(max_health_and_stream_calls=300)
    with pytest.raises(ValueError, match=r"max_health_and_stream_calls \(0\)"):
        ServerConfig(max_health_and_stream_calls=0)
    assert ServerConfig(max_health_and_stream_calls=256).max_health_and_stream_calls == 256


def test_a_clips_limits_come_from_the_identification_sections(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nmax_inflight_pixels = 300000000\n"
                   "[identification]\nmax_frames = 120\nmax_request_pixels = 200000000\nvideo_timeout_s = 4\n"
                   "video_cpu_s = 3\n"
                   "[identification.frame]\nmax_scans = 40\n")
    limits = load_config(cfg).clip_limits
    assert (limits.max_frames, limits.max_request_pixels, limits.video_timeout_s) == (120, 200_000_000, 4)
    assert limits.max_clips == 16  # untouched default
    # A frame keeps the clip's own defaults where the section is silent (4 MB, 4 MP), not a liveness image's.
    assert (limits.frame.max_scans, limits.frame.max_bytes, limits.frame.max_pixels) == (40, 4 << 20, 4_000_000)
    video = limits.video()
    assert (video.max_frames, video.timeout_s, video.cpu_s, video.max_scans) == (120, 4, 3, 40)


@pytest.mark.parametrize("text, message", [
    ("[identification]\nmax_frames = 1\n", r"min_frames \(2\) must be at least 2 and at most max_frames \(1\)"),
    ("[identification]\nvideo_timeout_s = 0\n", "clip limits must be positive: video_timeout_s = 0"),
    ("[identification]\nvideo_cpu_s = -1\n", "clip limits must be positive: video_cpu_s = -1"),
    ("[identification.frame]\nmax_scans = -1\n", "clip limits must be positive: frame.max_scans = -1"),
    ('[identification]\nmax_clips = "4"\n', "max_clips must be int, got '4'"),
    ("[identification]\nmax_frame = 10\n", r"\[identification\]: unknown setting\(s\) \['max_frame'\]"),
    ("[identification.frame]\nmax_bytes = 20000000\n", r"identification.frame.max_bytes \(20000000\)"),
    ("[identification]\nmax_request_pixels = 300000000\n", r"max_inflight_pixels \(250000000\) must be at least "
                                                           r"identification.max_request_pixels \(300000000\)"),
])
def test_a_bad_clip_limit_is_refused_at_start_up(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(cfg)


@pytest.mark.parametrize("text", ["health_port = 50051\nport = 50051", "health_port = 8002", "health_port = -1",
                                  "health_port = 70000"])
def test_the_health_port_is_a_port_of_its_own(text: str, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f"[server]\n{text}\n")
    with pytest.raises(ValueError, match="health_port must lie in"):
        load_config(tmp_path / "c.toml")
    assert ServerConfig(health_port=8081).health_port == 8081


def test_streams_leave_room_for_health_checks() -> None:
    """Health watches and reflection streams may hold three quarters of the health-and-stream bound (at least one
    slot is kept for checks, which probes make)."""
    assert [ServerConfig(max_health_and_stream_calls=n).stream_calls() for n in (1, 2, 3, 4, 64)] == [1, 1, 2, 3, 48]
