"""`make demo`: the whole platform on this machine, used over HTTP as a user would.

Starts the control API, a worker and the inference service on the embedded default (a SQLite
file, the `filesystem://` broker and a local-folder object store, all under `.demo/`), puts the
bundled target-domain images (seeded, so every run sees the same ones) in the store, submits an
adaptation of the tiny CLIP with the platform's defaults (no hyperparameters, no templates:
what a user's first job sends) and shows its progress and what the label-free guard chose to
serve, then scores held-out labelled images through `/predict`: the zero-shot baseline, then
the adaptation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.shapes import CLASS_NAMES, iter_domain, png_bytes, write_folder
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH, TARGET_TEST_SEED
from client.http import MustClient
from client.progress import JobProgressBar, describe_job
from services.launcher import Platform

DEMO_DIR = Path(".demo")
BATCH = 64  # the inference service takes at most 64 files per request by default


def embedded_env(root: Path) -> dict[str, str]:
    """Settings of the embedded default, with every file under `root`."""
    root = root.resolve()
    return {
        "MUST_ENVIRONMENT": "embedded",
        "MUST_DATABASE__URL": f"sqlite:///{root / 'must.db'}",
        "MUST_BROKER__URL": "filesystem://",
        "MUST_BROKER__FILESYSTEM_FOLDER": str(root / "broker"),
        "MUST_STORAGE__ARTIFACTS_URI": (root / "store" / "artifacts").as_uri(),
    }


def score(client: MustClient, fields: dict[str, str], images: Sequence[tuple[bytes, int]]) -> float:
    """Top-1 (%) of POST /predict with `fields` (an adaptation or a zero-shot model) on labelled images."""
    correct = 0
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        files = [("files", (f"{start + i}.png", data, "image/png")) for i, (data, _) in enumerate(batch)]
        answer = client.inference.request("POST", "/predict", data=fields | {"top_k": "1"}, files=files)
        for result, (_, label) in zip(answer.json()["results"], batch, strict=True):
            correct += result["predictions"][0]["label"] == CLASS_NAMES[label]
    return 100.0 * correct / len(images)


def run(platform: Platform, dataset_uri: str, args: argparse.Namespace) -> float:
    """Adapt, wait, score; return the adapted top-1."""
    model = {"config": str(CONFIG_PATH.resolve()), "checkpoint": str(CHECKPOINT_PATH.resolve())}
    labelled = iter_domain("target", args.test_images, seed=TARGET_TEST_SEED)
    held_out = [(png_bytes(image), label) for image, label in labelled]
    with MustClient(platform.control_url, platform.inference_url, timeout=120) as client:
        zero_shot_fields = {"model": json.dumps(model), "class_names": ",".join(CLASS_NAMES)}
        zero_shot = score(client, zero_shot_fields, held_out)
        print(f"zero-shot target top-1 on {len(held_out)} held-out images: {zero_shot:.1f}%")

        hparams: dict[str, Any] | None = {"total_steps": args.steps} if args.steps else None
        job = client.adapt(dataset_uri, CLASS_NAMES, model=model, hparams=hparams)
        schedule = f"{args.steps} steps" if args.steps else "the default schedule"
        print(f"submitted adaptation {job.id}: MUST on {args.images} unlabeled images, {schedule}")
        started = time.perf_counter()
        with JobProgressBar() as bar:
            job = client.wait(job.id, poll_seconds=1.0, on_update=bar.update)
        if job.status != "succeeded":
            error = f"{job.error.type}: {job.error.message}" if job.error else job.status.value
            raise SystemExit(f"the adaptation did not succeed: {error}; logs in {platform.log_dir}/")
        print(
            f"adaptation succeeded in {time.perf_counter() - started:.0f} s; classifier at {job.artifact.uri}"
        )
        print(describe_job(job))

        adapted = score(client, {"adaptation_id": job.id}, held_out)
        count = len(held_out)
        print(f"target top-1 on {count} held-out images: zero-shot {zero_shot:.1f}% -> MUST {adapted:.1f}%")
        example_path = DEMO_DIR / "example.png"
        image, label = next(iter_domain("target", 1, seed=2024))
        image.save(example_path)
        answer = client.predict_url(job.id, example_path.resolve().as_uri(), top_k=3)
        guesses = ", ".join(f"{p['label']} {p['probability']:.2f}" for p in answer["predictions"])
        print(f"GET /predict {example_path} (a {CLASS_NAMES[label]}): {guesses}")
    return adapted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000, help="unlabeled target-domain images")
    parser.add_argument("--steps", type=int, default=None, help="smoke runs only: fewer steps")
    parser.add_argument("--test-images", type=int, default=500)
    args = parser.parse_args(argv)
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    env = embedded_env(DEMO_DIR)
    dataset = DEMO_DIR / "store" / "datasets" / "shapes-target"
    print(f"putting {args.images} unlabeled target-domain images in the store at {dataset}/")
    write_folder("target", args.images, seed=7, out=dataset)
    platform = Platform(env=env, log_dir=DEMO_DIR / "logs")
    print("starting the control API, a worker and the inference service ...")
    with platform:
        print(f"control API {platform.control_url}/docs, inference {platform.inference_url}/docs")
        run(platform, dataset.resolve().as_uri(), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
