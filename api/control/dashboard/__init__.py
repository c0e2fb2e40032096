"""The dashboard: static pages served by the control API itself (no extra service, no CDN).

The pages hold no data and need no key to load; every number they show comes from the API's own
authenticated routes, called from the browser with the key the user typed into the page's login
prompt (kept in sessionStorage, sent as `Authorization: Bearer`). Charts are drawn with Chart.js,
vendored under static/vendor (versions and origin in static/vendor/README.md).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
MOUNT = "/dashboard"

# Only the page's own files run or style it; images are thumbnails fetched as blobs.
# https://developer.mozilla.org/en-US/docs/Web/HTTP/Headers/Content-Security-Policy
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The pages change with the code; the browser checks back (ETag) rather than keep a stale copy.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """StaticFiles with the dashboard's security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at /dashboard/ and send a browser opening / there."""

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{MOUNT}/")

    app.mount(MOUNT, DashboardFiles(directory=STATIC_DIR, html=True), name="dashboard")
