"""Property-based fuzzing of both OpenAPI documents with schemathesis, every check on.

Each service is fuzzed with tenant alpha's key by `schemathesis run --checks all` (examples,
coverage, fuzzing and stateful phases), and its JSON report is read back. Failures are sorted by
schemathesis' codes: ST101 is a 5xx answer (`server_errors`), the other ST1xx codes are answers
that do not match the document (status code, body schema, content type, headers:
`schema_violations`), ST4xx are authorization findings (`auth_violations`), and the rest
(ST2xx/ST3xx: data acceptance, headers, methods, stateful) are `other_findings`.
https://schemathesis.readthedocs.io/en/stable/reference/checks/

One setting is ours: for the operations whose inputs name things outside the request (an
existing bucket and prefix for POST /adaptations; a model, an image or a stored image for
/predict), a schema-valid request is still refused with 422 when those things do not exist,
so `positive_data_acceptance` counts 422 as an expected answer there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.faults.stack import Stack

CONFIGS = {
    "control": """\
[[operations]]
include-path = "/adaptations"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
""",
    "inference": """\
[[operations]]
include-path = "/predict"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "413", "422"]
""",
}


@dataclass
class FuzzResult:
    """Counts over both services."""

    cases: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    auth_violations: int = 0
    other_findings: int = 0
    details: list[str] = field(default_factory=list)

    def add_report(self, service: str, report: dict[str, object]) -> None:
        cases = report.get("test_cases") or {}
        self.cases += int(cases.get("generated", 0)) if isinstance(cases, dict) else 0
        for failure in report.get("failures") or []:  # type: ignore[attr-defined]
            code, count = str(failure["code"]), int(failure.get("count", 1))
            where = ", ".join(failure.get("operations", []))
            self.details.append(f"{service}: {code} {failure['title']} x{count} ({where})")
            if code == "ST101":
                self.server_errors += count
            elif code.startswith("ST1"):
                self.schema_violations += count
            elif code.startswith("ST4"):
                self.auth_violations += count
            else:
                self.other_findings += count
        for error in report.get("errors") or []:  # type: ignore[attr-defined]
            # Errors of schemathesis itself (a generator that crashed), not answers of the service.
            self.details.append(f"{service}: schemathesis error {str(error)[:300]}")


def fuzz_service(
    stack: Stack, service: str, url: str, max_examples: int, out: Path, seed: int
) -> dict[str, object]:
    """Run schemathesis against one service's OpenAPI document; return its JSON report."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / f"{service}.toml"
    config.write_text(CONFIGS[service])
    report = out / f"{service}.json"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file", str(config),
        "run", f"{url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(max_examples),
        "--header", f"Authorization: Bearer {stack.keys['alpha']}",
        "--seed", str(seed),
        "--workers", "2",
        "--request-timeout", "60",
        "--generation-database", "none",
        "--no-color",
        "--report", "json,junit",
        "--report-dir", str(out),
        "--report-json-path", str(report),
    ]  # fmt: skip
    with (out / f"{service}.log").open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=3600, check=False)
    data: dict[str, object] = json.loads(report.read_text())
    return data


def fuzz(
    stack: Stack, *, control_examples: int, inference_examples: int, out: Path, seed: int = 1
) -> FuzzResult:
    """Fuzz both services; the counts add up over both."""
    result = FuzzResult()
    for service, url, examples in (
        ("control", stack.platform.control_url, control_examples),
        ("inference", stack.platform.inference_url, inference_examples),
    ):
        result.add_report(service, fuzz_service(stack, service, url, examples, out, seed))
    return result
