"""Training jobs under faults: SIGKILLed workers, a broker restart without persistence, S3 outages.

Every job is a small adaptation of the tiny CLIP submitted through the control API as tenant
alpha. A job counts as *lost* when it ends in any state but `succeeded`, and as *stuck* when it
has not ended by the phase's deadline.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine, select

from bench.faults.stack import TERMINAL, Stack
from bench.shapes import CLASS_NAMES
from services.db.models import Job

RESUMED = re.compile(r"resumed from step (\d+)")


@dataclass
class JobsOutcome:
    """What happened to the jobs of one phase."""

    submitted: int = 0
    lost: int = 0
    stuck: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: JobsOutcome) -> None:
        self.submitted += other.submitted
        self.lost += other.lost
        self.stuck += other.stuck
        self.notes += other.notes


@dataclass
class KillOutcome(JobsOutcome):
    kills: int = 0
    max_steps_repeated: int = 0


class Jobs:
    """Submitting, watching and judging the bench's jobs."""

    def __init__(self, stack: Stack, images: int = 48) -> None:
        self.stack = stack
        self.dataset = stack.put_images("faults/dataset/", images, seed=7)
        self.model = stack.tiny_clip()
        self.engine = create_engine(stack.db_url)

    def submit(self, total_steps: int, checkpoint_every: int = 5, who: str = "alpha") -> str:
        body = {
            "class_names": list(CLASS_NAMES),
            "dataset": {"uri": self.dataset},
            "model": self.model,
            "templates": ["a photo of a {}."],
            "hparams": {
                "total_steps": total_steps,
                "batch_size": 16,
                "checkpoint_every": checkpoint_every,
                "seed": 0,
            },
        }
        with self.stack.control(who) as http:
            answer = http.post("/adaptations", json=body)
        if answer.status_code != 202:
            raise RuntimeError(f"submit failed: {answer.status_code} {answer.text}")
        return str(answer.json()["id"])

    def get(self, job_id: str) -> dict[str, Any]:
        with self.stack.control("admin") as http:
            answer: dict[str, Any] = http.get(f"/adaptations/{job_id}").raise_for_status().json()
        return answer

    def owner_pid(self, job_id: str) -> int | None:
        """The process id of the worker holding the job's lease (owner is host:pid:task)."""
        with self.engine.connect() as conn:
            owner = conn.execute(select(Job.lease_owner).where(Job.id == job_id)).scalar_one_or_none()
        return int(owner.split(":")[1]) if owner else None

    def wait(self, job_id: str, until: Any, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if until(job):
                return job
            time.sleep(0.3)
        return None

    def judge(self, job_ids: list[str], timeout: float) -> JobsOutcome:
        """Wait for every job to end; count the lost and the stuck."""
        outcome = JobsOutcome(submitted=len(job_ids))
        deadline = time.monotonic() + timeout
        for job_id in job_ids:
            job = self.wait(job_id, lambda j: j["status"] in TERMINAL, max(1.0, deadline - time.monotonic()))
            if job is None:
                outcome.stuck += 1
                outcome.notes.append(f"job {job_id} did not end: {self.get(job_id)['status']}")
            elif job["status"] != "succeeded":
                outcome.lost += 1
                outcome.notes.append(f"job {job_id} ended {job['status']}: {job['error']}")
        return outcome

    def resumed_steps(self, job_id: str) -> list[int]:
        """Every "resumed from step N" the workers logged for the job, in log order per worker."""
        steps = []
        for worker in self.stack.platform.workers():
            for line in worker.log_path.read_text(errors="replace").splitlines():
                if job_id in line and (match := RESUMED.search(line)):
                    steps.append(int(match.group(1)))
        return steps

    def close(self) -> None:
        self.engine.dispose()


def kill_workers(jobs: Jobs, kills: int, total_steps: int, timeout: float, seed: int = 0) -> KillOutcome:
    """SIGKILL the worker running one job at random steps, `kills` times; start a worker for each."""
    rng = random.Random(seed)
    job_id = jobs.submit(total_steps=total_steps, checkpoint_every=5)
    outcome = KillOutcome(submitted=1)
    for _ in range(kills):
        resumed_before = len(jobs.resumed_steps(job_id))
        job = jobs.wait(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0, timeout)
        if job is None or job["status"] in TERMINAL:
            break
        target = job["progress"]["step"] + rng.randint(1, 9)
        job = jobs.wait(
            job_id, lambda j, t=target: j["progress"]["step"] >= t or j["status"] in TERMINAL, timeout
        )
        pid = jobs.owner_pid(job_id)
        if job is None or job["status"] in TERMINAL or pid is None:
            break
        worker = next((w for w in jobs.stack.platform.workers() if w.proc.pid == pid), None)
        if worker is None:
            break
        reached = jobs.get(job_id)["progress"]["step"]
        worker.proc.kill()
        worker.proc.wait(timeout=30)
        outcome.kills += 1
        jobs.stack.platform.start_worker()
        resumed = jobs.wait(
            job_id,
            lambda j, n=resumed_before: len(jobs.resumed_steps(job_id)) > n or j["status"] in TERMINAL,
            timeout,
        )
        steps = jobs.resumed_steps(job_id)
        if resumed is not None and len(steps) > resumed_before:
            outcome.max_steps_repeated = max(outcome.max_steps_repeated, reached - steps[-1])
    judged = jobs.judge([job_id], timeout)
    outcome.lost, outcome.stuck, outcome.notes = judged.lost, judged.stuck, judged.notes
    return outcome


def broker_restart(
    jobs: Jobs, owners: list[str], total_steps: int, timeout: float
) -> tuple[JobsOutcome, list[str]]:
    """Queue one job per owner (more than there are workers), restart Redis without persistence
    while some run and some wait, and judge them all; also return the jobs' ids."""
    job_ids = [jobs.submit(total_steps=total_steps, who=who) for who in owners]
    count = len(job_ids)
    workers = len(jobs.stack.platform.workers())

    def running(job_id: str) -> bool:
        return bool(jobs.get(job_id)["status"] == "running")

    deadline = time.monotonic() + timeout
    while sum(running(j) for j in job_ids) < min(workers, count) and time.monotonic() < deadline:
        time.sleep(0.3)
    states = [jobs.get(j)["status"] for j in job_ids]
    jobs.stack.redis.restart()
    outcome = jobs.judge(job_ids, timeout)
    outcome.notes.insert(0, f"broker restarted with jobs {', '.join(states)}")
    return outcome, job_ids


def s3_outages(
    jobs: Jobs, durations: list[float], total_steps: int, timeout: float
) -> tuple[JobsOutcome, str]:
    """Take the S3 server away for each of `durations` seconds while one job trains; judge the job."""
    job_id = jobs.submit(total_steps=total_steps, checkpoint_every=5)
    notes = []
    for seconds in durations:
        job = jobs.wait(job_id, lambda j: j["status"] == "running" and bool(j["checkpoint_uri"]), timeout)
        if job is None or job["status"] in TERMINAL:
            notes.append(f"the job was {job and job['status']} before the {seconds:g} s outage")
            break
        step = job["progress"]["step"]
        with jobs.stack.proxy.outage():
            time.sleep(seconds)
        notes.append(f"S3 away for {seconds:g} s from step {step}")
        # Let the job take a few steps on a reachable store before the next outage.
        jobs.wait(
            job_id, lambda j, s=step: j["progress"]["step"] >= s + 5 or j["status"] in TERMINAL, timeout
        )
    outcome = jobs.judge([job_id], timeout)
    requeues = _storage_requeues(jobs, job_id)
    outcome.notes = notes + [f"storage requeues: {requeues}"] + outcome.notes
    return outcome, job_id


def _storage_requeues(jobs: Jobs, job_id: str) -> int:
    with jobs.engine.connect() as conn:
        return int(conn.execute(select(Job.storage_requeues).where(Job.id == job_id)).scalar_one())
