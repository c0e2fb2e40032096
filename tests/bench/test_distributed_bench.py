"""Smoke run of the data-parallel bench: two gloo ranks on the CPU against one process, tiny CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_distributed_bench_times_one_process_and_two_ranks(tmp_path: Path) -> None:
    args = distributed.parser().parse_args(
        ["--gpus", "2", "--cpu", "--steps", "3", "--warmup", "1", "--batch-size", "8", "--images", "32"]
    )

    result = distributed.bench(args, tmp_path)

    assert (result["one"]["processes"], result["many"]["processes"]) == (1, 2)
    assert result["one"]["steps"] == result["many"]["steps"] == 3
    assert result["one"]["images_per_sec"] > 0
    assert result["many"]["images_per_sec"] > 0
    assert result["scaling"] == pytest.approx(
        result["many"]["images_per_sec"] / result["one"]["images_per_sec"], abs=1e-3
    )
    assert result["ideal"] == 2
