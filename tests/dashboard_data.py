"""Jobs arranged in the job database as a worker leaves them, for the dashboard's API and browser tests.

A real job on the tiny CLIP has a handful of classes and a few dozen metric rows; these helpers
give the dashboard what a long job on a large label set leaves (20,000 metric rows, 200 classes)
without running one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from services.db.models import JobMetric
from services.jobs import repository

OWNER = "dashboard-test-worker"
SPIKE_STEP = 7_777
SPIKE = 50.0


def metric_values(step: int, total: int) -> dict[str, Any]:
    """A metrics row as the worker writes it: a loss that falls, with a spike at SPIKE_STEP."""
    t = step / total
    loss = 2.0 * math.exp(-3 * t) + 0.05 * math.sin(step / 7.0) + 0.5
    return {
        "step": step,
        "total_steps": total,
        "images_per_sec": 200.0,
        "lr": 1e-4 * 0.5 * (1 + math.cos(math.pi * t)),
        "ema_decay": 0.999,
        "loss": SPIKE if step == SPIKE_STEP else loss,
        "self_training": 0.8 * loss,
        "fairness": 0.1,
        "mim": 0.3,
        "align": 0.05,
        "confident_fraction": 0.4 + 0.5 * t,
        "mean_pred_entropy": 3.0,
        "normalized_mean_pred_entropy": 0.9,
        "agreement": 0.5 + 0.4 * t,
        "teacher_max_prob": 0.6,
    }


def start_job(session_factory: sessionmaker[Session], request: dict[str, Any], total_steps: int) -> str:
    """A job created and taken by a worker, as it is while training."""
    with session_factory() as session:
        job = repository.create_job(session, request=request, idempotency_key=None)
        repository.mark_running(session, job.id, owner=OWNER, lease_seconds=3600)
        repository.update_progress(
            session, job.id, owner=OWNER, step=total_steps, total_steps=total_steps, images_used=600
        )
        return job.id


def add_metric_rows(session_factory: sessionmaker[Session], job_id: str, count: int) -> None:
    """`count` metric rows at steps 1..count, in one transaction."""
    with session_factory() as session:
        session.add_all(
            JobMetric(job_id=job_id, step=step, values=metric_values(step, count))
            for step in range(1, count + 1)
        )
        session.commit()


def write_images(folder: Path, count: int) -> list[str]:
    """`count` small PNGs of distinct colours in `folder`; their keys in a store rooted there."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(count):
        colour = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
        name = f"img-{i:05d}.png"
        Image.new("RGB", (48, 40), colour).save(folder / name)
        keys.append(name)
    return keys


def outcome_for(class_names: list[str], keys: list[str], per_class: int = 3) -> dict[str, Any]:
    """What the worker records for a job serving the teacher: guard scores, class counts and samples."""
    k = len(class_names)
    zero_shot = [0] * k
    zero_shot[0] = len(keys)  # zero-shot puts every image in the first class: the bias MUST corrects
    served = [len(keys) // k + (1 if i < len(keys) % k else 0) for i in range(k)]
    sample_keys: list[list[str]] = [[] for _ in range(k)]
    for i, key in enumerate(keys):
        if len(sample_keys[i % k]) < per_class:
            sample_keys[i % k].append(key)
    candidate = {
        "step": 0,
        "gain_zs_space": 0.0,
        "gain_own_space": 0.0,
        "zero_shot_in_own_space": 0.5,
        "balance": 0.2,
        "agreement_with_zero_shot": 1.0,
        "mean_confidence": 0.4,
    }
    return {
        "served": "teacher",
        "reason": "the teacher beat zero-shot by the guard margin",
        "candidates": [
            {**candidate, "name": "zero_shot", "margin": 0.0},
            {**candidate, "name": "student", "step": 100, "margin": 0.01, "balance": 0.9},
            {**candidate, "name": "teacher", "step": 100, "margin": 0.0312, "balance": 0.95},
        ],
        "views": None,
        "threshold": [0.5],
        "predictions": {
            "images": len(keys),
            "class_counts": {"zero_shot": zero_shot, "teacher": served},
            "confidence_quantiles": {"0.5": 0.6},
        },
        "samples": {
            "classifier": "teacher",
            "per_class": per_class,
            "images": len(keys),
            "keys": sample_keys,
            "zero_shot": [[0] * len(row) for row in sample_keys],
            "confidence": [[0.75] * len(row) for row in sample_keys],
        },
    }


def finish_job(session_factory: sessionmaker[Session], job_id: str, outcome: dict[str, Any]) -> None:
    """Mark the job succeeded with `outcome`, as the worker does after exporting."""
    with session_factory() as session:
        repository.mark_succeeded(
            session,
            job_id,
            artifact_uri="file:///nowhere/classifier",
            artifact_sha256="0" * 64,
            owner=OWNER,
            served=outcome["served"],
            outcome=outcome,
        )
