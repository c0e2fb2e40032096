"""The inference service against the bare model it serves, measured in one run on one machine.

    .venv/bin/python -m bench.inference [--models tiny,vit-b-32] [--rounds 3] [--workers 1]

For each model an adapted artifact is exported (the tiny CLIP, and open_clip's `ViT-B-32` with
random weights and a zero-shot head from its random text tower), recorded as a succeeded
adaptation in a SQLite job database and a local artifacts store, and served by the inference
service in a subprocess as compose runs it (`python -m api.inference.serve`, `--workers`
processes, one by default).
Clients on loopback keep 1, 8 and 32 `POST /predict` requests of one JPEG each in flight.
Right before and right after the runs at 32 and at 1 in flight, the bench process runs the same
classifier on the same images, preprocessed the way the service does it: a batched forward in a
tight loop, or a single-image forward, at one intra-op thread and at one per core (the bare
model's best counts). A shared machine's speed drifts from minute to minute by more than the
differences measured, so each round compares the service with the bare model measured seconds
around it, and the ratios are the median over `--rounds` of those bracketed ratios.

Prints a table and, as its last line, one JSON object with, per model, `throughput_ratio_32`
(service images/s at 32 in flight / raw batched images/s) and `latency_ratio_1` (service p50 at
1 in flight / raw single-image forward), each round's ratios, the ratios as each side's best
round alone would give them (`best_of_rounds`), and the peak RSS of the service's largest process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.loopback import children, free_port, peak_rss_mb, running
from bench.shapes import CLASS_NAMES, sample
from bench.tiny_clip import TINY_CLIP_SPEC
from services.db.migrate import upgrade
from services.db.session import make_engine, make_session_factory
from services.jobs import repository
from services.must.adapt import prepare
from services.must.data import decode_image
from services.must.export import MANIFEST, WEIGHTS, export_classifier, load_classifier
from services.must.inference import ImageClassifier
from services.must.loading import ModelSpec
from services.storage.keys import classifier_manifest_key, classifier_weights_key
from services.storage.local import LocalObjectStore

LEVELS = (1, 8, 32)
RAW_BATCH = 32
BOUNDARY = "must-bench-boundary"


@dataclass(frozen=True)
class Case:
    """One model to benchmark: its spec, the uploaded image size and how many requests per level."""

    spec: ModelSpec
    image_px: int
    requests: dict[int, int]
    raw_batches: int
    raw_singles: int


CASES = {
    "tiny": Case(TINY_CLIP_SPEC, 64, {1: 200, 8: 800, 32: 1600}, 60, 200),
    "vit-b-32": Case(ModelSpec(arch="ViT-B-32"), 256, {1: 12, 8: 48, 32: 96}, 2, 12),
}


@dataclass(frozen=True)
class Level:
    """Service figures at one number of requests in flight."""

    images_per_s: float
    p50_ms: float
    p95_ms: float


@dataclass
class Round:
    """One pass over every measurement, each service level bracketed by the bare model's figure."""

    # Keyed by torch's intra-op thread count: the bare model is given its best setting.
    raw_batched_images_per_s: dict[int, list[float]] = field(default_factory=dict)
    raw_single_ms: dict[int, list[float]] = field(default_factory=dict)
    service: dict[int, Level] = field(default_factory=dict)

    def best_batched(self) -> list[float]:
        """Per bracketing measurement, the bare model's batched images/s at its best thread count."""
        return [max(runs) for runs in zip(*self.raw_batched_images_per_s.values(), strict=True)]

    def best_single(self) -> list[float]:
        """Per bracketing measurement, the bare model's one-image ms at its best thread count."""
        return [min(runs) for runs in zip(*self.raw_single_ms.values(), strict=True)]

    def throughput_ratio_32(self) -> float:
        """Service images/s at 32 in flight over the bare model's, measured just before and after."""
        return self.service[32].images_per_s / statistics.mean(self.best_batched())

    def latency_ratio_1(self) -> float:
        """Service p50 at 1 in flight over the bare one-image forward, measured just before and after."""
        return self.service[1].p50_ms / statistics.mean(self.best_single())


# ---- artifact and the service's world --------------------------------------------------------


def export_artifact(case: Case, out_dir: Path) -> Path:
    """Export the model's zero-shot classifier as an adapted artifact; returns its folder."""
    torch.manual_seed(0)
    prepared = prepare(case.spec, CLASS_NAMES)
    export_classifier(
        prepared.classifier(),
        out_dir,
        model_cfg=prepared.clip.model_cfg,
        templates=prepared.templates,
        source_model=prepared.source_model(),
    )
    return out_dir


def record_adaptation(export_dir: Path, root: Path) -> tuple[dict[str, str], str]:
    """A job database and artifacts store holding the export as a succeeded adaptation.

    Returns the service's environment and the adaptation id.
    """
    db_url = f"sqlite:///{root / 'jobs.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    with make_session_factory(engine)() as session:
        job_id = repository.create_job(
            session, request={"class_names": list(CLASS_NAMES)}, idempotency_key=None
        ).id
        store = LocalObjectStore(root / "store")
        store.upload_file(classifier_weights_key(job_id), export_dir / WEIGHTS)
        store.upload_file(classifier_manifest_key(job_id), export_dir / MANIFEST)
        sha = json.loads((export_dir / MANIFEST).read_text())["weights_sha256"]
        repository.mark_running(session, job_id, owner="bench", lease_seconds=60)
        repository.mark_succeeded(session, job_id, artifact_uri="bench", artifact_sha256=sha)
    engine.dispose()
    env = {
        "MUST_ENVIRONMENT": "embedded",
        "MUST_DATABASE__URL": db_url,
        "MUST_STORAGE__ARTIFACTS_URI": f"file://{root / 'store'}",
        "TMPDIR": str(root),
    }
    return env, job_id


def jpeg_images(case: Case, count: int) -> list[bytes]:
    """Synthetic target-domain images, encoded as the JPEGs clients upload."""
    out = []
    for i in range(count):
        image, _ = sample("target", i, seed=11, size=case.image_px)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ---- clients -----------------------------------------------------------------------------------


def predict_request(job_id: str, jpeg: bytes) -> bytes:
    """A complete HTTP/1.1 `POST /predict` request uploading one JPEG."""
    fields = [("adaptation_id", job_id), ("top_k", "5")]
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="image.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    body = "".join(parts).encode() + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    """Send one request on a kept-alive connection and read the whole answer; raise unless 200."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    body = await reader.readexactly(length)
    if not lines[0].startswith("HTTP/1.1 200"):
        raise RuntimeError(f"{lines[0]}: {body[:300]!r}")


@dataclass
class _Load:
    """What the clients of one load share: how many answers to count, and those counted."""

    total: int
    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    # time.perf_counter() when the last counted answer came back.
    end: float = 0.0


async def _client(port: int, requests: list[bytes], load: _Load) -> None:
    """One connection sending requests back to back until `load.total` answers came back.

    Every client keeps sending until then, so as many requests are in flight at the last counted
    answer as at the first. (A load that drained a fixed number of requests would end with fewer
    and fewer in flight: for a model whose batch takes a second, a large part of a short run.)
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while len(load.latencies) < load.total:
            request = requests[load.sent % len(requests)]
            load.sent += 1
            start = time.perf_counter()
            await _exchange(reader, writer, request)
            if len(load.latencies) < load.total:  # answers after the last counted one are not
                load.latencies.append(time.perf_counter() - start)
                load.end = time.perf_counter()
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], in_flight: int, total: int) -> tuple[float, list[float]]:
    """Seconds until the `total`-th answer, and the latencies of the first `total` answers."""
    load = _Load(total)
    start = time.perf_counter()
    await asyncio.gather(*(_client(port, requests, load) for _ in range(in_flight)))
    return load.end - start, load.latencies


def measure_service(port: int, requests: list[bytes], in_flight: int, total: int) -> Level:
    """Images/s and latency percentiles with `in_flight` requests outstanding (after one warm-up wave)."""
    asyncio.run(_load(port, requests, in_flight, in_flight))
    seconds, latencies = asyncio.run(_load(port, requests, in_flight, total))
    cuts = statistics.quantiles(latencies, n=20)
    return Level(total / seconds, statistics.median(latencies) * 1e3, cuts[18] * 1e3)


# ---- the bare model ----------------------------------------------------------------------------


def preprocessed(classifier: ImageClassifier, jpegs: list[bytes]) -> torch.Tensor:
    """The images as the classifier's own preprocessing turns them into pixels."""
    return classifier.preprocess([decode_image(data) for data in jpegs])


@torch.inference_mode()
def raw_batched(classifier: ImageClassifier, pixels: torch.Tensor, batches: int) -> float:
    """Images/s of back-to-back forwards of RAW_BATCH images (after one warm-up batch)."""
    batch = pixels[:RAW_BATCH].repeat((RAW_BATCH + len(pixels) - 1) // len(pixels), 1, 1, 1)[:RAW_BATCH]
    classifier(batch).softmax(-1)
    start = time.perf_counter()
    for _ in range(batches):
        classifier(batch).softmax(-1)
    return batches * RAW_BATCH / (time.perf_counter() - start)


@torch.inference_mode()
def raw_single_ms(classifier: ImageClassifier, pixels: torch.Tensor, count: int) -> float:
    """Median milliseconds of a one-image forward (after one warm-up)."""
    classifier(pixels[:1]).softmax(-1)
    times = []
    for i in range(count):
        start = time.perf_counter()
        classifier(pixels[i % len(pixels) : i % len(pixels) + 1]).softmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ---- one model ---------------------------------------------------------------------------------


def thread_counts() -> list[int]:
    """One intra-op thread, and torch's default (one per core)."""
    return sorted({1, torch.get_num_threads()})


def _raw(result: Round, classifier: ImageClassifier, pixels: torch.Tensor, case: Case, batched: bool) -> None:
    """One bare-model measurement at each thread count, appended to the round."""
    default = torch.get_num_threads()
    for threads in thread_counts():
        torch.set_num_threads(threads)
        if batched:
            figure = raw_batched(classifier, pixels, case.raw_batches)
            result.raw_batched_images_per_s.setdefault(threads, []).append(figure)
        else:
            figure = raw_single_ms(classifier, pixels, case.raw_singles)
            result.raw_single_ms.setdefault(threads, []).append(figure)
    torch.set_num_threads(default)


def run_round(
    case: Case, classifier: ImageClassifier, pixels: torch.Tensor, port: int, requests: list[bytes]
) -> Round:
    """The service at each level; the two that are compared with the bare model are bracketed by it.

    The speed of a shared machine drifts by more than the differences measured here, so each
    ratio compares the service with the bare model measured seconds before and after it.
    """
    result = Round()
    for level in LEVELS:
        bare = {1: False, 32: True}.get(level)
        if bare is not None:
            _raw(result, classifier, pixels, case, batched=bare)
        result.service[level] = measure_service(port, requests, level, case.requests[level])
        if bare is not None:
            _raw(result, classifier, pixels, case, batched=bare)
    return result


def summarize(rounds: list[Round], rss_mb: float) -> dict[str, Any]:
    """The ratios: the median over rounds of each round's bracketed ratio; and each side's best figures."""
    raw_batched_best = max(max(r.best_batched()) for r in rounds)
    raw_single_best = min(min(r.best_single()) for r in rounds)
    service = {}
    for level in LEVELS:
        runs = [r.service[level] for r in rounds]
        service[level] = Level(
            max(x.images_per_s for x in runs), min(x.p50_ms for x in runs), min(x.p95_ms for x in runs)
        )
    return {
        "throughput_ratio_32": round(statistics.median(r.throughput_ratio_32() for r in rounds), 3),
        "latency_ratio_1": round(statistics.median(r.latency_ratio_1() for r in rounds), 3),
        "rounds_throughput_ratio_32": [round(r.throughput_ratio_32(), 3) for r in rounds],
        "rounds_latency_ratio_1": [round(r.latency_ratio_1(), 3) for r in rounds],
        # Each side's best round, as earlier versions of this bench computed the ratios.
        "best_of_rounds": {
            "throughput_ratio_32": round(service[32].images_per_s / raw_batched_best, 3),
            "latency_ratio_1": round(service[1].p50_ms / raw_single_best, 3),
        },
        "raw_batched_images_per_s": round(raw_batched_best, 2),
        "raw_single_ms": round(raw_single_best, 2),
        "service": {
            str(level): {
                "images_per_s": round(x.images_per_s, 2),
                "p50_ms": round(x.p50_ms, 2),
                "p95_ms": round(x.p95_ms, 2),
            }
            for level, x in service.items()
        },
        "service_peak_rss_mb": round(rss_mb, 1),
        "rounds": len(rounds),
    }


def bench_model(
    name: str, case: Case, rounds: int, root: Path, service_env: dict[str, str], workers: int = 1
) -> dict[str, Any]:
    """Export, serve and measure one model."""
    print(f"[{name}] exporting the artifact", file=sys.stderr)
    export_dir = export_artifact(case, root / "export")
    env, job_id = record_adaptation(export_dir, root)
    env.update(service_env)
    classifier = load_classifier(export_dir)
    jpegs = jpeg_images(case, 64)
    pixels = preprocessed(classifier, jpegs)
    requests = [predict_request(job_id, data) for data in jpegs]
    port = free_port()
    # As compose runs it (api.inference.serve), without the access log; one worker unless asked.
    args = [sys.executable, "-m", "api.inference.serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "warning", "--no-access-log", "--workers", str(workers)]
    results = []
    with running(args, f"http://127.0.0.1:{port}/healthz", env, root / "uvicorn.log") as server:
        for i in range(rounds):
            print(f"[{name}] round {i + 1}/{rounds}", file=sys.stderr)
            results.append(run_round(case, classifier, pixels, port, requests))
            print_round(name, i + 1, results[-1])
        # With several workers, the launcher's own process only supervises them.
        rss = max(peak_rss_mb(pid) for pid in [server.pid, *children(server.pid)])
    return {**summarize(results, rss), "workers": workers}


def print_round(name: str, index: int, result: Round) -> None:
    """One table row per measurement of a round, and its two bracketed ratios."""
    for threads, figures in result.raw_batched_images_per_s.items():
        shown = " / ".join(f"{x:.2f}" for x in figures)
        print(f"{name:<9} round {index}  raw, {threads} thread(s): batched {shown} img/s (around @32)")
    for threads, figures in result.raw_single_ms.items():
        shown = " / ".join(f"{x:.2f}" for x in figures)
        print(f"{name:<9} round {index}  raw, {threads} thread(s): single {shown} ms (around @1)")
    for level, x in result.service.items():
        print(
            f"{name:<9} round {index}  service @{level:<3} {x.images_per_s:9.2f} img/s   "
            f"p50 {x.p50_ms:8.2f} ms   p95 {x.p95_ms:8.2f} ms"
        )
    print(
        f"{name:<9} round {index}  ratios: throughput @32 {result.throughput_ratio_32():.3f}, "
        f"latency @1 {result.latency_ratio_1():.3f}"
    )


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    """Each side's best figures over the rounds, and the median of the rounds' bracketed ratios."""
    print(
        f"\n{'model':<9} {'raw img/s':>10} {'svc@32 img/s':>13} {'ratio32':>8} "
        f"{'raw 1 ms':>9} {'svc@1 p50':>10} {'ratio1':>7} {'svc@8 img/s':>12} {'RSS MB':>8}"
    )
    for name, r in results.items():
        s = r["service"]
        print(
            f"{name:<9} {r['raw_batched_images_per_s']:>10.2f} {s['32']['images_per_s']:>13.2f} "
            f"{r['throughput_ratio_32']:>8.3f} {r['raw_single_ms']:>9.2f} {s['1']['p50_ms']:>10.2f} "
            f"{r['latency_ratio_1']:>7.3f} {s['8']['images_per_s']:>12.2f} {r['service_peak_rss_mb']:>8.1f}"
        )
        print(
            f"{'':<9} rounds' ratios: @32 {r['rounds_throughput_ratio_32']}, "
            f"@1 {r['rounds_latency_ratio_1']}; "
            f"best of rounds: @32 {r['best_of_rounds']['throughput_ratio_32']}, "
            f"@1 {r['best_of_rounds']['latency_ratio_1']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(CASES), help=f"comma-separated, among {', '.join(CASES)}"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the service (default 1)")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service process, e.g. OMP_NUM_THREADS=1 (repeatable)",
    )
    args = parser.parse_args()
    service_env = dict(item.split("=", 1) for item in args.service_env)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown models {unknown}; choose among {list(CASES)}")
    start = time.perf_counter()
    results = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"must-bench-inference-{name}-") as tmp:
            results[name] = bench_model(name, CASES[name], args.rounds, Path(tmp), service_env, args.workers)
    print_summary(results)
    summary: dict[str, Any] = {
        **{name: results[name] for name in names},
        "service_env": service_env,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
