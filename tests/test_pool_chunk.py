"""How a clip's decoding steps are split into pool jobs: wide for a lone clip, one job a step under load."""

from __future__ import annotations

import math

import pytest

from server.pipelines.decode_plan import pool_chunk


@pytest.mark.parametrize(("n", "in_flight", "jobs"), [
    (42, 1, 4), (5, 1, 2), (20, 1, 4), (2, 1, 1),  # alone: up to 4 jobs of >= 3 frames
    (42, 2, 2), (20, 2, 2),  # two clips: two jobs each
    (42, 3, 1), (42, 16, 1), (5, 16, 1),  # more: one job a step, the other clips fill the cores
    (42, 0, 4),  # (never below one clip)
])
def test_jobs_per_step_shrink_as_clips_share_the_pool(n: int, in_flight: int, jobs: int) -> None:
    chunk = pool_chunk(n, in_flight)
    assert chunk >= 3
    assert math.ceil(n / chunk) == jobs
