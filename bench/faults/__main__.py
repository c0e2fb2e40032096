"""`python -m bench.faults [--smoke]`: the platform under faults, on the real stack on loopback.

    .venv/bin/python -m bench.faults            # the full run (README gives its time)
    .venv/bin/python -m bench.faults --smoke    # a short run, as the test suite does

Starts PostgreSQL's database, a private Redis, an S3 server behind a TCP proxy, the control API,
the inference service and two workers (bench.faults.stack), then:

1. fuzzes both OpenAPI documents with schemathesis, every check on (bench.faults.fuzz);
2. takes S3 away during a training job (15 s, then 60 s) and restarts Redis without persistence
   with jobs running and queued; SIGKILLs the worker running a job at random steps, starting
   a new worker each time (bench.faults.jobs);
3. tries every tenant-crossing action on the other tenant's jobs (bench.faults.tenancy);
4. sends the image-bomb batch, then keeps 50 clients predicting (bench.faults.load).

Prints a table, then one JSON line with: fuzz_cases, server_errors, schema_violations, kills,
jobs_lost, jobs_stuck, max_steps_repeated, tenancy_violations, peak_rss_mb, errors (and a few
more). Targets: 0 lost, 0 stuck, 0 server errors, 0 schema violations, 0 tenancy violations,
inference peak RSS under 2 GB. Exit status 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.faults.fuzz import FuzzResult, fuzz
from bench.faults.jobs import Jobs, JobsOutcome, KillOutcome, broker_restart, kill_workers, s3_outages
from bench.faults.load import LoadOutcome, load
from bench.faults.stack import running_stack
from bench.faults.tenancy import TenancyOutcome, tenancy

PEAK_RSS_TARGET_MB = 2048


@dataclass(frozen=True)
class Profile:
    """How hard each phase pushes."""

    control_examples: int
    inference_examples: int
    outages_s: tuple[float, ...]
    storage_retry_s: float
    outage_steps: int
    broker_owners: tuple[str, ...]
    broker_steps: int
    kills: int
    kill_steps: int
    clients: int
    load_s: float
    timeout_s: float


FULL = Profile(
    control_examples=50,
    inference_examples=300,
    outages_s=(15, 60),
    storage_retry_s=20,
    outage_steps=400,
    broker_owners=("alpha", "beta", "alpha"),
    broker_steps=60,
    kills=10,
    kill_steps=600,
    clients=50,
    load_s=60,
    timeout_s=900,
)
SMOKE = Profile(
    control_examples=4,
    inference_examples=15,
    outages_s=(2, 8),
    storage_retry_s=3,
    outage_steps=120,
    broker_owners=("alpha", "beta", "alpha"),
    broker_steps=20,
    kills=2,
    kill_steps=150,
    clients=50,
    load_s=5,
    timeout_s=420,
)


def _phase(name: str, started: float) -> None:
    print(f"[{time.monotonic() - started:7.1f} s] {name}", flush=True)


def run(profile: Profile, root: Path) -> dict[str, Any]:
    """Every phase on one stack; the figures of the JSON line."""
    started = time.monotonic()
    _phase("starting the stack", started)
    with running_stack(root, storage_retry_seconds=profile.storage_retry_s) as stack:
        jobs = Jobs(stack)
        try:
            _phase("fuzzing both OpenAPI documents", started)
            fuzzed = fuzz(
                stack,
                control_examples=profile.control_examples,
                inference_examples=profile.inference_examples,
                out=root / "fuzz",
            )
            _phase(f"S3 outages of {', '.join(f'{s:g} s' for s in profile.outages_s)}", started)
            outages, alpha_job = s3_outages(
                jobs, list(profile.outages_s), profile.outage_steps, profile.timeout_s
            )
            _phase("broker restart without persistence", started)
            broker, broker_jobs = broker_restart(
                jobs, list(profile.broker_owners), profile.broker_steps, profile.timeout_s
            )
            _phase(f"{profile.kills} SIGKILLs of the worker running a job", started)
            killed = kill_workers(jobs, profile.kills, profile.kill_steps, profile.timeout_s)
            _phase("tenant-crossing actions", started)
            beta_job = broker_jobs[list(profile.broker_owners).index("beta")]
            crossed = tenancy(jobs, alpha_job, beta_job)
            _phase(f"image bomb and {profile.clients} clients for {profile.load_s:g} s", started)
            loaded = load(stack, alpha_job, clients=profile.clients, seconds=profile.load_s)
        finally:
            jobs.close()
    return _report(profile, fuzzed, outages, broker, killed, crossed, loaded, time.monotonic() - started)


def _report(
    profile: Profile,
    fuzzed: FuzzResult,
    outages: JobsOutcome,
    broker: JobsOutcome,
    killed: KillOutcome,
    crossed: TenancyOutcome,
    loaded: LoadOutcome,
    seconds: float,
) -> dict[str, Any]:
    all_jobs = JobsOutcome()
    for outcome in (outages, broker, killed):
        all_jobs.add(outcome)
    phases = {
        "fuzz": {
            "cases": fuzzed.cases,
            "auth_violations": fuzzed.auth_violations,
            "other_findings": fuzzed.other_findings,
            "details": fuzzed.details,
        },
        "s3_outages": {"durations_s": list(profile.outages_s), **_jobs(outages)},
        "broker_restart": {"jobs": broker.submitted, **_jobs(broker)},
        "kills": {"kills": killed.kills, **_jobs(killed)},
        "tenancy": {"checks": crossed.checks, "notes": crossed.notes},
        "load": {
            "bomb_status": loaded.bomb_status,
            "requests": loaded.requests,
            "p50_ms": loaded.p50_ms,
            "p95_ms": loaded.p95_ms,
            "max_ms": loaded.max_ms,
            "notes": loaded.notes,
        },
    }
    return {
        "phases": phases,
        "fuzz_cases": fuzzed.cases,
        "server_errors": fuzzed.server_errors,
        "schema_violations": fuzzed.schema_violations,
        "kills": killed.kills,
        "jobs_lost": all_jobs.lost,
        "jobs_stuck": all_jobs.stuck,
        "max_steps_repeated": killed.max_steps_repeated,
        "tenancy_violations": crossed.violations,
        "peak_rss_mb": round(loaded.peak_rss_mb, 1),
        "errors": loaded.errors,
        "seconds": round(seconds, 1),
    }


def _jobs(outcome: JobsOutcome) -> dict[str, Any]:
    return {"lost": outcome.lost, "stuck": outcome.stuck, "notes": outcome.notes}


def targets_met(report: dict[str, Any]) -> bool:
    zero = ("server_errors", "schema_violations", "jobs_lost", "jobs_stuck", "tenancy_violations", "errors")
    return all(report[key] == 0 for key in zero) and report["peak_rss_mb"] < PEAK_RSS_TARGET_MB


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    phases = report["phases"]
    fuzz_, outage, broker, kills, load_ = (
        phases[name] for name in ("fuzz", "s3_outages", "broker_restart", "kills", "load")
    )
    return [
        (
            "fuzzing (both services)",
            f"{report['fuzz_cases']} cases",
            f"{report['server_errors']} server errors, {report['schema_violations']} schema violations, "
            f"{fuzz_['auth_violations']} auth, {fuzz_['other_findings']} other findings",
        ),
        (
            "S3 outages",
            ", ".join(f"{s:g} s" for s in outage["durations_s"]),
            f"{outage['lost']} lost, {outage['stuck']} stuck",
        ),
        (
            "broker restart (nosave)",
            f"{broker['jobs']} jobs",
            f"{broker['lost']} lost, {broker['stuck']} stuck",
        ),
        (
            "SIGKILLed workers",
            f"{report['kills']} kills",
            f"{kills['lost']} lost, {kills['stuck']} stuck, "
            f"at most {report['max_steps_repeated']} steps repeated",
        ),
        (
            "tenant crossings",
            f"{phases['tenancy']['checks']} actions",
            f"{report['tenancy_violations']} violations",
        ),
        (
            "bomb + concurrent clients",
            f"{load_['requests']} requests",
            f"bomb {load_['bomb_status']}, {report['errors']} errors, p50 {load_['p50_ms']:.0f} ms, "
            f"max {load_['max_ms']:.0f} ms, "
            f"peak RSS {report['peak_rss_mb']:.0f} MB",
        ),
    ]


def print_table(report: dict[str, Any]) -> None:
    rows = _rows(report)
    width = max(len(row[0]) for row in rows)
    middle = max(len(row[1]) for row in rows)
    print(f"\n{'phase':<{width}}  {'load':<{middle}}  outcome")
    for name, amount, outcome in rows:
        print(f"{name:<{width}}  {amount:<{middle}}  {outcome}")
    for phase, values in report["phases"].items():
        for note in values.get("notes", []) + values.get("details", []):
            print(f"  {phase}: {note}")
    print(f"\n{report['seconds']:.0f} s in all; targets {'met' if targets_met(report) else 'NOT met'}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a short run (the test suite's)")
    parser.add_argument("--out", type=Path, help="keep logs and reports here (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="must-faults-"))
    try:
        report = run(SMOKE if args.smoke else FULL, root)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(report)
    summary = {key: value for key, value in report.items() if key != "phases"}
    print(json.dumps(summary), flush=True)
    return 0 if targets_met(report) else 1


if __name__ == "__main__":
    sys.exit(main())
