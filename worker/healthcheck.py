"""The worker container's health check: `python -m worker.healthcheck` (exit 0 healthy, 1 not).

It probes the worker's metrics endpoint on the port the settings give it
(`MUST_METRICS__WORKER_PORT`), so changing the port does not break the check; with the endpoint
turned off (port 0) it checks that the broker is reachable instead. No torch is loaded.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from kombu import Connection

from services.config import Settings, get_settings
from worker.celery_app import broker_transport_options

TIMEOUT_S = 4.0


def check(settings: Settings) -> str | None:
    """None when healthy, else what is wrong."""
    port = settings.metrics.worker_port
    if port:
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
                return None if answer.status == 200 else f"{url} answered {answer.status}"
        except (urllib.error.URLError, OSError) as exc:
            return f"the worker's metrics endpoint {url} does not answer: {exc}"
    try:
        with Connection(settings.broker.url, transport_options=broker_transport_options(settings)) as conn:
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
    except Exception as exc:  # kombu raises transport-specific errors
        return f"the broker is unreachable: {type(exc).__name__}"
    return None


def main() -> int:
    problem = check(get_settings())
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
