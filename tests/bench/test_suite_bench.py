"""Smoke run of the suite bench: the real command on a few images and steps, and its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.suite import CASES

pytestmark = pytest.mark.slow


def test_suite_prints_a_row_per_case_and_the_summary_line() -> None:
    names = [CASES[0].name, CASES[-1].name]  # one case per tiny CLIP, two processes
    args = ["--cases", *names, "--train-images", "40", "--test-images", "20", "--steps", "4", "--jobs", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.suite", *args], capture_output=True, text=True, timeout=600
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT THE DEFAULTS" in done.stderr  # a smoke run says it is one
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"cases", "mean_gain_served", "min_gain_served", "seconds"} <= set(summary)
    assert [case["case"] for case in summary["cases"]] == names  # in the suite's order, not finishing order
    case = summary["cases"][0]
    expected = {"classes", "images", "zero_shot", "teacher", "student", "served", "served_classifier"}
    assert expected | {"gain_served", "minutes"} <= set(case)
    assert case["gain_served"] == pytest.approx(case["served"] - case["zero_shot"], abs=0.02)
    assert case["served_classifier"] in set(case["guard"])
    assert summary["min_gain_served"] == min(c["gain_served"] for c in summary["cases"])
    table = next(line for line in done.stdout.splitlines() if line.startswith(names[0]))
    assert case["served_classifier"] in table
