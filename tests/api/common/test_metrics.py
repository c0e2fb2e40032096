"""`/metrics` of the control API: requests and latency by route template and status, jobs by status."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.control.main import create_app
from services.config import Settings
from tests.api.fakes import RecordingJobQueue


def scrape(client: TestClient, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one `/metrics` answer, parsed as Prometheus does."""
    answer = client.get("/metrics", **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def requests(samples: dict[Any, float], route: str, status: str, method: str = "GET") -> float:
    """The request counter for one route template, status and method (0 if absent)."""
    labels = (("method", method), ("route", route), ("status", status))
    return samples.get(("must_http_requests_total", labels), 0.0)


def test_requests_are_counted_by_route_template_and_status(client: TestClient, body: dict[str, Any]) -> None:
    job_id = client.post("/adaptations", json=body).json()["id"]
    client.get(f"/adaptations/{job_id}")
    client.get("/adaptations/0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10")
    client.get("/adaptations/0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10")
    client.post("/adaptations", json={"class_names": ["only-one"]})
    client.get("/no/such/path")

    samples = scrape(client)

    assert requests(samples, "/adaptations", "202", "POST") == 1
    assert requests(samples, "/adaptations", "422", "POST") == 1
    assert requests(samples, "/adaptations/{adaptation_id}", "200") == 1
    assert requests(samples, "/adaptations/{adaptation_id}", "404") == 2
    assert requests(samples, "<unmatched>", "404") == 1
    # No series names a raw job id: the label is the route's template.
    assert not any(job_id in str(labels) for _, labels in samples)
    latency = (("method", "GET"), ("route", "/adaptations/{adaptation_id}"), ("status", "404"))
    assert samples[("must_http_request_duration_seconds_count", latency)] == 2
    assert samples[("must_http_request_duration_seconds_sum", latency)] > 0


def test_jobs_are_reported_by_status(client: TestClient, body: dict[str, Any]) -> None:
    first = client.post("/adaptations", json=body).json()["id"]
    client.post("/adaptations", json=body)
    client.post(f"/adaptations/{first}/cancel")

    samples = scrape(client)

    jobs = {dict(labels)["status"]: value for (name, labels), value in samples.items() if name == "must_jobs"}
    assert jobs == {"queued": 1, "cancelled": 1, "running": 0, "succeeded": 0, "failed": 0}
    assert samples[("must_jobs_query_up", ())] == 1


def test_metrics_still_answer_when_the_database_is_unreachable(settings: Settings) -> None:
    broken = settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": "sqlite:////nonexistent/dir/x.db"})}
    )
    # No `with`: the lifespan (which would migrate that database) is not run.
    client = TestClient(create_app(broken, queue=RecordingJobQueue()))

    samples = scrape(client)

    assert samples[("must_jobs_query_up", ())] == 0
    assert not any(name == "must_jobs" for name, _ in samples)


def test_two_apps_in_one_process_keep_separate_counts(client: TestClient, settings: Settings) -> None:
    client.get("/healthz")
    other = TestClient(create_app(settings, queue=RecordingJobQueue()))

    assert requests(scrape(client), "/healthz", "200") == 1
    assert requests(scrape(other), "/healthz", "200") == 0
