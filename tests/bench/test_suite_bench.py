"""Smoke run of the suite bench: the real command on a few images and steps, and its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.suite import CASES, RECORDED_MUST_MINUTES, RECORDED_MUST_SERVED

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
    # The instant column: the same cases, timed on their own, and the sums beside MUST's.
    assert {"mean_gain_instant", "min_gain_instant", "instant_seconds", "must_seconds"} <= set(summary)
    assert case["instant_served_classifier"] in {"instant", "zero_shot"}
    assert case["gain_instant"] == pytest.approx(case["instant_served"] - case["zero_shot"], abs=0.02)
    assert summary["min_gain_instant"] == min(c["gain_instant"] for c in summary["cases"])
    assert summary["instant_seconds"] == pytest.approx(
        sum(c["instant_seconds"] for c in summary["cases"]), abs=0.2
    )
    assert summary["must_seconds_source"] == "measured in this run"
    assert summary["must_seconds"] == pytest.approx(sum(c["minutes"] * 60 for c in summary["cases"]), abs=2)


def test_instant_only_skips_must_and_takes_must_seconds_from_the_recorded_run() -> None:
    args = ["--cases", CASES[0].name, "--train-images", "40", "--test-images", "20", "--instant-only"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.suite", *args], capture_output=True, text=True, timeout=600
    )

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    (case,) = summary["cases"]
    assert (case["teacher"], case["student"], case["served"], summary["mean_gain_served"]) == (None,) * 4
    assert summary["must_seconds"] == 60 * RECORDED_MUST_MINUTES[CASES[0].name]
    assert summary["must_seconds_source"].startswith("recorded:")
    # Both sums are rounded to 0.1 s in the summary; the ratio is of the unrounded ones.
    ratio = summary["instant_seconds"] / summary["must_seconds"]
    assert summary["instant_time_ratio"] == pytest.approx(ratio, abs=0.06 / summary["must_seconds"] + 1e-5)


def test_instant_only_refuses_must_options() -> None:
    args = ["--cases", CASES[0].name, "--instant-only", "--steps", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.suite", *args], capture_output=True, text=True, timeout=120
    )

    assert done.returncode != 0
    assert "--instant-only runs no MUST" in done.stderr


def test_few_label_rows_per_count_of_labels_with_the_baselines() -> None:
    args = ["--few-label", "--cases", CASES[0].name, "--train-images", "40", "--test-images", "20"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.suite", *args], capture_output=True, text=True, timeout=600
    )

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    (case,) = summary["few_label"]
    assert case["case"] == CASES[0].name
    assert [row["shots"] for row in case["rows"]] == [1, 4, 16]
    for row in case["rows"]:
        assert {"instant", "instant_served", "linear_probe"} <= set(row)
        assert row["instant_served_classifier"] in {"instant", "zero_shot"}
        assert "must" not in row  # only with --few-label-must
    assert summary["must_no_labels"] == {CASES[0].name: RECORDED_MUST_SERVED[CASES[0].name]}
    assert summary["must_no_labels_source"].startswith("recorded:")
    assert sum(1 for line in done.stdout.splitlines() if line.startswith(CASES[0].name)) == 3
