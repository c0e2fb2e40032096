"""Metric rows to per-metric series, and min/max downsampling that keeps the ends and the extremes."""

from __future__ import annotations

import math
import random

import pytest

from services.jobs.series import Series, downsample, downsampled_series, split_series


def test_rows_split_into_one_series_per_numeric_metric() -> None:
    rows = [
        (1, {"step": 1, "total_steps": 3, "loss": 2.0, "note": "warm-up", "flag": True}),
        (2, {"step": 2, "total_steps": 3, "loss": float("nan"), "lr": 1e-4}),
        (3, {"step": 3, "total_steps": 3, "loss": 1.0, "lr": 2e-4}),
    ]

    series = split_series(rows)

    assert set(series) == {"loss", "lr"}
    assert (series["loss"].steps, series["loss"].values) == ([1, 3], [2.0, 1.0])
    assert (series["lr"].steps, series["lr"].values) == ([2, 3], [1e-4, 2e-4])


def test_a_series_within_the_bound_is_returned_whole() -> None:
    points = Series(list(range(10)), [float(v) for v in range(10)])

    assert downsample(points, 10) is points


@pytest.mark.parametrize(("n", "max_points"), [(20_000, 1000), (20_000, 4), (1001, 1000), (12_345, 777)])
def test_downsampling_keeps_the_ends_and_every_buckets_extremes(n: int, max_points: int) -> None:
    rng = random.Random(n)
    values = [math.sin(i / 50) + rng.gauss(0, 0.1) for i in range(n)]
    values[n // 3] = 100.0
    values[2 * n // 3] = -100.0
    points = Series(list(range(1, n + 1)), values)

    kept = downsample(points, max_points)

    assert len(kept.steps) <= max_points
    assert len(kept.steps) >= min(n, max_points) - 2
    assert kept.steps == sorted(set(kept.steps))
    assert (kept.steps[0], kept.steps[-1]) == (1, n)
    assert (max(kept.values), min(kept.values)) == (100.0, -100.0)
    assert all(points.values[s - 1] == v for s, v in zip(kept.steps, kept.values, strict=True))


def test_too_small_a_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        downsample(Series([1, 2, 3, 4, 5], [1.0] * 5), 3)


def test_every_series_is_bounded() -> None:
    rows = [(s, {"loss": 1.0 / s, "lr": 0.1}) for s in range(1, 5001)]

    series = downsampled_series(rows, 100)

    assert {name: len(s.steps) <= 100 for name, s in series.items()} == {"loss": True, "lr": True}
