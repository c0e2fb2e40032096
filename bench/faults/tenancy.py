"""Every tenant-crossing action on another tenant's job, and what each must get.

Tenant beta acts on tenant alpha's succeeded job (and alpha on beta's): each action that is not
refused the way the platform promises (404 as if the job did not exist, 422 for a URL into the
artifacts store, a job of its own for a reused idempotency key, 401 without a key) is one
violation. The owners and the admin key must still reach the jobs (a 404 for everyone would
pass the first checks for the wrong reason), so a failure there counts too.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

from bench.faults.jobs import Jobs
from bench.faults.stack import Stack


@dataclass
class TenancyOutcome:
    checks: int = 0
    violations: int = 0
    notes: list[str] = field(default_factory=list)

    def expect(self, what: str, answer: httpx.Response, ok: Callable[[httpx.Response], bool]) -> None:
        self.checks += 1
        if not ok(answer):
            self.violations += 1
            self.notes.append(f"{what}: {answer.status_code} {answer.text[:200]}")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _status(code: int) -> Callable[[httpx.Response], bool]:
    return lambda answer: answer.status_code == code


def _crossing(stack: Stack, out: TenancyOutcome, owner: str, other: str, job_id: str, own_job: str) -> None:
    """`other` (whose own job is `own_job`) acting on `owner`'s job."""
    image = _png()
    url = stack.put(f"faults/tenancy/{other}.png", image)
    artifact = stack.uri(f"platform/adaptations/{job_id}/classifier/model.safetensors")
    with stack.control(other) as http:
        out.expect(f"{other} reads {owner}'s job", http.get(f"/adaptations/{job_id}"), _status(404))
        out.expect(f"{other} reads its metrics", http.get(f"/adaptations/{job_id}/metrics"), _status(404))
        out.expect(f"{other} cancels it", http.post(f"/adaptations/{job_id}/cancel"), _status(404))
        for params in ({}, {"status": "succeeded"}, {"limit": "200"}):
            listed = http.get("/adaptations", params=params)
            out.expect(
                f"{other} lists jobs {params}",
                listed,
                lambda a: a.status_code == 200 and job_id not in {i["id"] for i in a.json()["items"]},
            )
    with stack.inference(other) as http:
        get = http.get("/predict", params={"adaptation_id": job_id, "image_url": url})
        out.expect(f"{other} predicts (GET) with {owner}'s classifier", get, _status(404))
        files = {"files": ("a.png", image, "image/png")}
        post = http.post("/predict", data={"adaptation_id": job_id}, files=files)
        out.expect(f"{other} predicts (POST) with {owner}'s classifier", post, _status(404))
        for target in (artifact, stack.uri(f"platform/adaptations/{job_id}/metrics.jsonl")):
            read = http.get("/predict", params={"adaptation_id": job_id, "image_url": target})
            out.expect(
                f"{other} reads {owner}'s artifacts as an image", read, lambda a: a.status_code in (404, 422)
            )


def _owners_and_admin(stack: Stack, out: TenancyOutcome, owner: str, job_id: str) -> None:
    for who in (owner, "admin"):
        with stack.control(who) as http:
            out.expect(f"{who} reads {owner}'s job", http.get(f"/adaptations/{job_id}"), _status(200))
    with stack.inference(owner) as http:
        files = {"files": ("a.png", _png(), "image/png")}
        out.expect(
            f"{owner} predicts with its classifier",
            http.post("/predict", data={"adaptation_id": job_id}, files=files),
            _status(200),
        )


def _idempotency(jobs: Jobs, out: TenancyOutcome) -> None:
    """The same Idempotency-Key and body from two tenants make two jobs, each its owner's only."""
    stack = jobs.stack
    body: dict[str, Any] = {
        "class_names": ["circle", "square"],
        "dataset": {"uri": jobs.dataset},
        "model": jobs.model,
        "hparams": {"total_steps": 1000, "batch_size": 16},
    }
    headers = {"Idempotency-Key": "faults-shared-key"}
    with stack.control("alpha") as alpha, stack.control("beta") as beta:
        first = alpha.post("/adaptations", json=body, headers=headers)
        second = beta.post("/adaptations", json=body, headers=headers)
        ids = [a.json().get("id") for a in (first, second) if a.status_code == 202]
        out.expect(
            "beta reuses alpha's idempotency key",
            second,
            lambda a: len(set(ids)) == 2 and a.status_code == 202,
        )
        if len(ids) == 2:
            out.expect("alpha reads beta's job", alpha.get(f"/adaptations/{ids[1]}"), _status(404))
        for http, job_id in zip((alpha, beta), ids, strict=False):
            http.post(f"/adaptations/{job_id}/cancel")


def _without_keys(stack: Stack, out: TenancyOutcome, job_id: str) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        with httpx.Client(base_url=stack.platform.control_url, headers=headers, timeout=30) as http:
            out.expect(
                f"no valid key reads a job {headers}", http.get(f"/adaptations/{job_id}"), _status(401)
            )
            out.expect("no valid key lists jobs", http.get("/adaptations"), _status(401))
        with httpx.Client(base_url=stack.platform.inference_url, headers=headers, timeout=30) as http:
            answer = http.post("/predict", data={"adaptation_id": job_id}, files={"files": ("a.png", _png())})
            out.expect("no valid key predicts", answer, _status(401))


def tenancy(jobs: Jobs, alpha_job: str, beta_job: str) -> TenancyOutcome:
    """Every crossing in both directions, the owners' and admin's own access, and keyless access."""
    out = TenancyOutcome()
    _crossing(jobs.stack, out, "alpha", "beta", alpha_job, own_job=beta_job)
    _crossing(jobs.stack, out, "beta", "alpha", beta_job, own_job=alpha_job)
    _owners_and_admin(jobs.stack, out, "alpha", alpha_job)
    _owners_and_admin(jobs.stack, out, "beta", beta_job)
    _idempotency(jobs, out)
    _without_keys(jobs.stack, out, alpha_job)
    return out
