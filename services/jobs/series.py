"""A job's metric history as one series per metric, downsampled for plots. Pure: no database, no torch.

A week-long job writes hundreds of thousands of metric rows; a chart shows a few hundred pixels.
Each series is cut into equal buckets of steps and keeps, per bucket, its lowest and highest
value (in step order). A spike or a collapse stays visible, as it would not with a plain stride,
and the first and last points are always kept, so a curve starts and ends where the run did.
This is the "min/max" decimation Chart.js applies in the browser, done before the bytes are sent.
https://www.chartjs.org/docs/latest/configuration/decimation.html
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Bookkeeping fields of a metrics row, not metrics.
NOT_SERIES = frozenset({"step", "total_steps"})
MIN_POINTS = 4


@dataclass
class Series:
    """One metric's points in step order."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def _number(value: Any) -> float | None:
    """A finite float for a plottable value; None for text, booleans, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def split_series(rows: Iterable[tuple[int, Mapping[str, Any]]]) -> dict[str, Series]:
    """Rows of (step, values) in step order → one series per numeric metric name."""
    series: dict[str, Series] = {}
    for step, values in rows:
        for name, raw in values.items():
            number = _number(raw)
            if name in NOT_SERIES or number is None:
                continue
            points = series.setdefault(name, Series())
            points.steps.append(step)
            points.values.append(number)
    return series


def _extremes(values: list[float], start: int, stop: int) -> list[int]:
    """The indices of the lowest and highest value in values[start:stop], in order, once each."""
    low = min(range(start, stop), key=values.__getitem__)
    high = max(range(start, stop), key=values.__getitem__)
    return sorted({low, high})


def downsample(points: Series, max_points: int) -> Series:
    """At most `max_points` of `points`: the first, the last and each bucket's min and max."""
    if max_points < MIN_POINTS:
        raise ValueError(f"max_points must be at least {MIN_POINTS}, got {max_points}")
    n = len(points.values)
    if n <= max_points:
        return points
    inner = n - 2
    buckets = (max_points - 2) // 2
    keep = [0]
    for b in range(buckets):
        start = 1 + b * inner // buckets
        stop = 1 + (b + 1) * inner // buckets
        if start < stop:
            keep += _extremes(points.values, start, stop)
    keep.append(n - 1)
    return Series([points.steps[i] for i in keep], [points.values[i] for i in keep])


def downsampled_series(rows: Iterable[tuple[int, Mapping[str, Any]]], max_points: int) -> dict[str, Series]:
    """Every numeric metric of `rows` as its own series of at most `max_points` points."""
    return {name: downsample(points, max_points) for name, points in split_series(rows).items()}
