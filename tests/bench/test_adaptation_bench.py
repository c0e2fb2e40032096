"""Smoke run of the adaptation bench: the real command, a few images and steps, its JSON line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from bench.adaptation import ABLATIONS

pytestmark = pytest.mark.slow


def test_adaptation_bench_prints_the_table_and_the_summary_line() -> None:
    args = ["--train-images", "24", "--test-images", "20", "--steps", "2", "--batch-size", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.adaptation", *args], capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {"source_zero_shot_top1", "target_zero_shot_top1", "must_top1", "gain"} <= set(summary)
    assert summary["gain"] == pytest.approx(summary["must_top1"] - summary["target_zero_shot_top1"], abs=0.02)
    assert set(summary["ablations"]) == set(ABLATIONS)
    must_row = next(line for line in lines if re.match(r"MUST\s+\d", line))
    assert "student=" in must_row
    assert "tau=" in must_row
