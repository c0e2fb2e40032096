"""Serve one adapted classifier in a fresh interpreter and say which heavy libraries that loaded.

    python -m tests.api.inference.footprint_driver ROOT [--release-cuda-pages]

ROOT holds `classifier/` (an exported classifier) and `*.png` images. The driver imports the
inference app, optionally releases the CUDA libraries' pages as a host without CUDA may at
startup, records the classifier as a succeeded adaptation in a SQLite database and a local
artifacts store under ROOT, sends the images to `POST /predict` through the app, and prints one
JSON object: the heavy modules loaded after the import and after serving, the answer, the bytes
released, the resident kB of CUDA library mappings before and after the release, and the peak
resident size of the process (VmHWM) in MB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.footprint import HEAVY


def loaded_heavy() -> list[str]:
    return [name for name in HEAVY if name in sys.modules]


def cuda_library_rss_kb() -> int:
    from api.inference.memory import CUDA_LIBRARY, SMAPS, read_mappings

    return sum(m.rss_kb for m in read_mappings(SMAPS.read_text()) if CUDA_LIBRARY.search(m.path))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def record_adaptation(root: Path) -> tuple[str, str]:
    """The database URL and the id of a succeeded adaptation whose classifier is ROOT/classifier."""
    from services.db.migrate import upgrade
    from services.db.session import make_engine, make_session_factory
    from services.jobs import repository
    from services.must.export import MANIFEST, WEIGHTS, read_manifest
    from services.storage.keys import classifier_manifest_key, classifier_weights_key
    from services.storage.local import LocalObjectStore

    db_url = f"sqlite:///{root / 'jobs.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    store = LocalObjectStore(root / "store")
    with make_session_factory(engine)() as session:
        job_id = repository.create_job(session, request={"class_names": ["a", "b"]}, idempotency_key=None).id
        store.upload_file(classifier_weights_key(job_id), root / "classifier" / WEIGHTS)
        store.upload_file(classifier_manifest_key(job_id), root / "classifier" / MANIFEST)
        sha = read_manifest(root / "classifier").weights_sha256
        repository.mark_running(session, job_id, owner="test", lease_seconds=60)
        repository.mark_succeeded(session, job_id, artifact_uri="test", artifact_sha256=sha)
    engine.dispose()
    return db_url, job_id


def serve(root: Path, db_url: str, job_id: str) -> Any:
    """The app's answer to POST /predict with ROOT's images for the adaptation."""
    from fastapi.testclient import TestClient

    from api.inference.main import ServingOptions, create_app
    from services.config import Settings

    settings = Settings(
        environment="embedded",
        database={"url": db_url},  # type: ignore[arg-type]
        storage={"artifacts_uri": (root / "store").as_uri()},  # type: ignore[arg-type]
    )
    app = create_app(settings, options=ServingOptions(device="cpu", cache_dir=root / "cache"))
    files = [("files", (path.name, path.read_bytes(), "image/png")) for path in sorted(root.glob("*.png"))]
    with TestClient(app) as client:
        answer = client.post("/predict", data={"adaptation_id": job_id, "top_k": "10"}, files=files)
    answer.raise_for_status()
    return answer.json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--release-cuda-pages", action="store_true")
    args = parser.parse_args()
    import api.inference.main  # noqa: F401
    from api.inference.memory import release_cuda_library_pages

    out: dict[str, Any] = {"heavy_after_import": loaded_heavy(), "cuda_rss_kb_before": cuda_library_rss_kb()}
    out["released"] = release_cuda_library_pages() if args.release_cuda_pages else 0
    out["cuda_rss_kb_after"] = cuda_library_rss_kb()
    db_url, job_id = record_adaptation(args.root)
    out["answer"] = serve(args.root, db_url, job_id)
    out["heavy_after_serving"] = loaded_heavy()
    out["peak_mb"] = peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
