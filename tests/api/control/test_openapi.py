"""The OpenAPI schema documents every route, with its docstring and the request example."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from api.common import health, metrics
from api.control.routes import adaptations, artifacts, predictions, samples

ENDPOINTS: dict[tuple[str, str], Callable[..., Any]] = {
    ("post", "/adaptations"): adaptations.create_adaptation,
    ("get", "/adaptations"): adaptations.list_adaptations,
    ("get", "/adaptations/{adaptation_id}"): adaptations.get_adaptation,
    ("post", "/adaptations/{adaptation_id}/cancel"): adaptations.cancel_adaptation,
    ("get", "/adaptations/{adaptation_id}/metrics"): adaptations.list_adaptation_metrics,
    ("get", "/adaptations/{adaptation_id}/metrics/series"): adaptations.get_adaptation_metric_series,
    ("get", "/adaptations/{adaptation_id}/samples"): samples.get_adaptation_samples,
    ("get", "/adaptations/{adaptation_id}/samples/{class_index}/{position}"): (
        samples.get_adaptation_sample_thumbnail
    ),
    ("get", "/adaptations/{adaptation_id}/logs"): adaptations.list_adaptation_logs,
    ("delete", "/adaptations/{adaptation_id}"): adaptations.delete_adaptation,
    ("get", "/adaptations/{adaptation_id}/artifact"): artifacts.get_artifact,
    ("get", "/adaptations/{adaptation_id}/artifact/{name}"): artifacts.stream_artifact_file,
    ("post", "/predictions"): predictions.create_prediction,
    ("get", "/predictions"): predictions.list_predictions,
    ("get", "/predictions/{run_id}"): predictions.get_prediction,
    ("get", "/predictions/{run_id}/results"): predictions.stream_prediction_results,
    ("get", "/healthz"): health.healthz,
    ("get", "/readyz"): health.readyz,
    ("get", "/metrics"): metrics.prometheus_metrics,
}


def test_every_route_is_documented_with_its_docstring(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()

    listed = {(method, path) for path, operations in spec["paths"].items() for method in operations}
    assert listed == set(ENDPOINTS)
    for (method, path), endpoint in ENDPOINTS.items():
        operation = spec["paths"][path][method]
        assert operation["summary"]
        assert operation["description"] == inspect.getdoc(endpoint)
    assert spec["info"]["title"] == "MUST control plane"


def test_request_and_response_examples_are_published(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    create = spec["paths"]["/adaptations"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AdaptationCreate"
    )
    assert schemas["AdaptationCreate"]["examples"][0]["dataset"]["uri"].startswith("s3://")
    assert schemas["AdaptationPublic"]["examples"][0]["status"] == "running"
    assert "idempotency-key" in {p["name"].lower() for p in create["parameters"]}
    assert create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ValidationErrorBody"
    )
