"""The inference service under an image-bomb batch and 50 concurrent clients; its peak memory."""

from __future__ import annotations

import asyncio
import io
import statistics
import time
from dataclasses import dataclass, field

import httpx
from PIL import Image

from bench.faults.stack import Stack
from bench.loopback import peak_rss_mb

BOMB_SIDE = 7000
BOMB_FILES = 16


@dataclass
class LoadOutcome:
    bomb_status: int = 0
    requests: int = 0
    errors: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    max_ms: float = 0.0
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)


def _png(side: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb(stack: Stack, adaptation_id: str) -> int:
    """POST 16 PNGs of 7000x7000 (2.3 GB once decoded) at once; return the status code."""
    data = _png(BOMB_SIDE, (30, 60, 90))
    files = [("files", (f"bomb-{i}.png", data, "image/png")) for i in range(BOMB_FILES)]
    with stack.inference("alpha") as http:
        return http.post("/predict", data={"adaptation_id": adaptation_id}, files=files).status_code


async def _client(
    http: httpx.AsyncClient,
    adaptation_id: str,
    image: bytes,
    until: float,
    out: LoadOutcome,
    latencies: list[float],
) -> None:
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            answer = await http.post(
                "/predict",
                data={"adaptation_id": adaptation_id},
                files={"files": ("a.png", image, "image/png")},
            )
            ok = answer.status_code == 200
            if not ok and len(out.notes) < 5:
                out.notes.append(f"{answer.status_code}: {answer.text[:200]}")
        except httpx.HTTPError as exc:
            ok = False
            if len(out.notes) < 5:
                took = time.perf_counter() - start
                out.notes.append(f"{type(exc).__name__} after {took:.2f} s: {exc!r}")
        latencies.append(time.perf_counter() - start)
        out.requests += 1
        out.errors += not ok


async def _clients(stack: Stack, adaptation_id: str, clients: int, seconds: float, out: LoadOutcome) -> None:
    image = _png(64, (200, 120, 40))
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=stack.platform.inference_url, headers=stack.headers("alpha"), timeout=120, limits=limits
    ) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(_client(http, adaptation_id, image, until, out, latencies) for _ in range(clients))
        )
    if latencies:
        ordered = sorted(latencies)
        out.p50_ms = 1000 * statistics.median(ordered)
        out.p95_ms = 1000 * ordered[int(0.95 * (len(ordered) - 1))]
        out.max_ms = 1000 * ordered[-1]


def load(stack: Stack, adaptation_id: str, *, clients: int, seconds: float) -> LoadOutcome:
    """The bomb, then `clients` concurrent clients for `seconds`; the inference process's peak RSS."""
    out = LoadOutcome()
    out.bomb_status = bomb(stack, adaptation_id)
    if out.bomb_status != 413:
        out.errors += 1
        out.notes.append(f"the image bomb got {out.bomb_status}, not 413")
    asyncio.run(_clients(stack, adaptation_id, clients, seconds, out))
    # The whole life of the process so far: startup, model loads, the bomb and the load.
    out.peak_rss_mb = peak_rss_mb(stack.platform.children["inference"].proc.pid)
    return out
