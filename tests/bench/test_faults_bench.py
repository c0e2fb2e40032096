"""Smoke run of the fault bench: the real command on the real stack, shorter faults, its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

KEYS = {
    "fuzz_cases",
    "server_errors",
    "schema_violations",
    "kills",
    "jobs_lost",
    "jobs_stuck",
    "max_steps_repeated",
    "tenancy_violations",
    "peak_rss_mb",
    "errors",
}


def test_the_fault_bench_meets_its_targets_on_a_short_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )

    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert set(summary) >= KEYS
    assert "phase" in done.stdout
    assert "tenant crossings" in done.stdout
    # The exit status says whether every target was met; the table's notes say what was not.
    assert done.returncode == 0, done.stdout[-4000:]
    assert summary["fuzz_cases"] >= 100
    assert summary["kills"] >= 2
    assert summary["server_errors"] == summary["schema_violations"] == 0
    assert summary["jobs_lost"] == summary["jobs_stuck"] == summary["tenancy_violations"] == 0
    assert summary["errors"] == 0
    assert summary["peak_rss_mb"] < 2048
