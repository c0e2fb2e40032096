"""Smoke runs of the performance benches on the tiny CLIP with a handful of requests and steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import inference, training
from bench.tiny_clip import TINY_CLIP_SPEC

pytestmark = pytest.mark.slow


def test_inference_bench_serves_the_artifact_and_reports_both_ratios(tmp_path: Path) -> None:
    case = inference.Case(TINY_CLIP_SPEC, 40, {1: 3, 8: 8, 32: 32}, raw_batches=2, raw_singles=3)

    # Two worker processes, as compose runs the service: the RSS is read from the workers.
    result = inference.bench_model("tiny", case, 1, tmp_path, {}, workers=2)

    assert result["throughput_ratio_32"] > 0
    assert result["latency_ratio_1"] > 0
    assert set(result["service"]) == {"1", "8", "32"}
    assert result["service_peak_rss_mb"] > 100
    assert result["workers"] == 2


def test_training_bench_runs_the_engine_and_a_staged_job(tmp_path: Path, moto_s3: str) -> None:
    case = training.Case(TINY_CLIP_SPEC, 40, batch_size=4, steps=2)

    result = training.bench_model("tiny", case, moto_s3, [1], 1, tmp_path)

    assert result["pipeline_ratio"] > 0
    assert set(result["runs"]) == {"engine", "job (default)", "job (1 workers)"}
    assert result["runs"]["job (default)"]["stage_s"] > 0


def test_inference_profile_reports_stages_steps_and_the_event_loop() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.profile_inference",
            "--in-flight",
            "1",
            "--requests",
            "20",
            "--top",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert run.returncode == 0, run.stderr[-2000:]
    assert "forward_start -> forward_end" in run.stdout
    assert "forwards busy" in run.stdout
    assert "decoding  " in run.stdout
    assert "event loop, top 5" in run.stdout
