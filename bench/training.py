"""The MUST training step fed from tensors in memory against a job fed from the object store.

    .venv/bin/python -m bench.training [--models tiny,vit-b-32] [--workers 0,2] [--rounds 2]

For each model (the tiny CLIP, and open_clip's `ViT-B-32` with random weights) the same
training schedule runs twice from the same zero-shot start:

- engine: `fit` on weak/strong views computed beforehand and held in memory, so each step is
  the engine's work alone (masking, teacher forward, student forward/backward, optimizer, EMA);
- job: what a worker does with a dataset URI. JPEGs in a bucket of a moto S3 server on a
  loopback port are listed, fetched concurrently and validated into a local folder
  (`worker.dataset.stage_images`), then `fit` reads, decodes and augments them (both views)
  through its DataLoader, once per `--workers` setting.

`pipeline_ratio` = job images/s / engine images/s, where job time counts staging and every
training step, and engine time every training step. Model loading, the text head and the
threshold calibration are left out of both: they do not depend on how images arrive. The job
uses the platform's default number of DataLoader workers; other settings are reported beside it.
Runs alternate over `--rounds` and each configuration keeps its best round, since other load on
a shared machine only slows a run down. Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.loopback import moto_s3
from bench.shapes import CLASS_NAMES, sample
from bench.tiny_clip import TINY_CLIP_SPEC
from services.config import Settings, StorageSettings
from services.must.adapt import PathViews, Prepared, prepare
from services.must.config import MustConfig, resolve
from services.must.data import decode_image
from services.must.loading import ModelSpec
from services.must.network import MustNetwork
from services.must.task import MustTask
from services.must.trainer import FitResult, TrainerHooks, fit, loader_workers
from services.must.transforms import TwoViews
from services.must.views import LADDER
from services.storage.s3 import make_s3_client
from worker.dataset import stage_images

PREFIX = "images/"


@dataclass(frozen=True)
class Case:
    """One model: its spec, the stored image size and the schedule (one pass over the images)."""

    spec: ModelSpec
    image_px: int
    batch_size: int
    steps: int

    @property
    def num_images(self) -> int:
        return self.batch_size * self.steps


CASES = {
    "tiny": Case(TINY_CLIP_SPEC, 48, 32, 20),
    "vit-b-32": Case(ModelSpec(arch="ViT-B-32"), 256, 8, 4),
}


@dataclass(frozen=True)
class Run:
    """One timed configuration."""

    name: str
    stage_s: float
    fit_s: float
    images: int
    steady_images_per_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / (self.stage_s + self.fit_s)


class TensorViews:
    """(index, seed) -> views computed beforehand: the engine's input with no loading work left."""

    def __init__(self, weak: torch.Tensor, strong: torch.Tensor) -> None:
        self.weak, self.strong = weak, strong

    def __len__(self) -> int:
        return len(self.weak)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, _ = key
        return self.weak[index], self.strong[index]


def jpegs(case: Case) -> list[bytes]:
    """The dataset's images, encoded as stored."""
    out = []
    for i in range(case.num_images):
        image, _ = sample("target", i, seed=21, size=case.image_px)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def upload(endpoint: str, bucket: str, images: list[bytes]) -> Settings:
    """Put the images in a fresh bucket; the settings a worker would read them with."""
    storage = StorageSettings(artifacts_uri=f"s3://{bucket}", s3_endpoint_url=endpoint)
    client = make_s3_client(storage)
    client.create_bucket(Bucket=bucket)
    for i, data in enumerate(images):
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{i:06d}.jpg", Body=data)
    return Settings(storage=storage)


def config(case: Case, workers: int | None = None) -> MustConfig:
    """The schedule, resolved as a job resolves it; `workers` None keeps the platform default."""
    base = MustConfig(
        total_steps=case.steps,
        batch_size=case.batch_size,
        threshold_mode="fixed",
        threshold=0.5,
        checkpoint_every=10**6,
        # The reference's student view (a job fits its own; the bench measures throughput).
        strong_crop_min=LADDER[0].crop_min,
        rand_augment=LADDER[0].policy,
        hflip=True,
    )
    if workers is not None:
        base = replace(base, num_workers=workers)
    return resolve(base, case.num_images)


def timed_fit(network: MustNetwork, dataset: Any, cfg: MustConfig) -> tuple[FitResult, list[float]]:
    """Train a fresh task on a copy of `network`; the time of each step's end."""
    task = MustTask(copy.deepcopy(network), cfg, torch.tensor(cfg.threshold))
    stamps: list[float] = []
    hooks = TrainerHooks(on_step=lambda _: stamps.append(time.perf_counter()))
    return fit(task, dataset, cfg, device="cpu", hooks=hooks), stamps


def steady_rate(stamps: list[float], batch: int) -> float:
    """Images/s over the steps after the first (which also starts the loader)."""
    if len(stamps) < 2:
        return 0.0
    return (len(stamps) - 1) * batch / (stamps[-1] - stamps[0])


def engine_run(prepared: Prepared, views: TensorViews, cfg: MustConfig) -> Run:
    """Steps on the in-memory views."""
    result, stamps = timed_fit(prepared.network, views, cfg)
    return Run(
        "engine", 0.0, result.seconds, cfg.total_steps * cfg.batch_size, steady_rate(stamps, cfg.batch_size)
    )


def job_run(prepared: Prepared, settings: Settings, uri: str, cfg: MustConfig, work: Path, label: str) -> Run:
    """Staging from the S3 server into an empty folder, then steps fed by the DataLoader."""
    start = time.perf_counter()
    staged = stage_images(uri, work, settings)
    stage_s = time.perf_counter() - start
    views = TwoViews(prepared.clip.preprocess, cfg.strong_crop_min, cfg.rand_augment, cfg.hflip)
    result, stamps = timed_fit(prepared.network, PathViews(staged.paths, views), cfg)
    images = cfg.total_steps * cfg.batch_size
    return Run(label, stage_s, result.seconds, images, steady_rate(stamps, cfg.batch_size))


def in_memory_views(prepared: Prepared, images: list[bytes], cfg: MustConfig) -> TensorViews:
    """Both views of every image, computed once."""
    views = TwoViews(prepared.clip.preprocess, cfg.strong_crop_min, cfg.rand_augment, cfg.hflip)
    pairs = [views(decode_image(data), seed) for seed, data in enumerate(images)]
    return TensorViews(torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs]))


def round_order(index: int, workers: list[int]) -> list[str]:
    """Engine, default job, other worker counts; reversed every other round so none is always first."""
    order = ["engine", "default", *(str(w) for w in workers)]
    return order if index % 2 == 0 else order[::-1]


def bench_model(
    name: str, case: Case, endpoint: str, workers: list[int], rounds: int, root: Path
) -> dict[str, Any]:
    """Every configuration of one model, alternating over the rounds; the best of each kept."""
    print(f"[{name}] preparing {case.num_images} images and the zero-shot model", file=sys.stderr)
    torch.manual_seed(0)
    prepared = prepare(case.spec, CLASS_NAMES)
    images = jpegs(case)
    bucket = f"bench-{name}-{int(time.time())}"
    settings = upload(endpoint, bucket, images)
    uri = f"s3://{bucket}/{PREFIX}"
    default_cfg = config(case)
    views = in_memory_views(prepared, images, default_cfg)
    default_workers = loader_workers(default_cfg, torch.device("cpu"))
    others = [w for w in workers if w != default_workers]
    best: dict[str, Run] = {}
    for r in range(rounds):
        for step in round_order(r, others):
            if step == "engine":
                run = engine_run(prepared, views, default_cfg)
            else:
                cfg = default_cfg if step == "default" else config(case, int(step))
                label = "job (default)" if step == "default" else f"job ({step} workers)"
                run = job_run(prepared, settings, uri, cfg, root / f"{name}-{r}-{step}", label)
            print_run(name, r + 1, run)
            if run.name not in best or run.images_per_s > best[run.name].images_per_s:
                best[run.name] = run
    return summarize(best, default_cfg, case)


def summarize(best: dict[str, Run], cfg: MustConfig, case: Case) -> dict[str, Any]:
    """The ratios against the engine and each run's figures."""
    engine = best["engine"].images_per_s
    return {
        "pipeline_ratio": round(best["job (default)"].images_per_s / engine, 3),
        "default_workers": loader_workers(cfg, torch.device("cpu")),
        "ratios": {name: round(run.images_per_s / engine, 3) for name, run in best.items()},
        "runs": {
            name: {
                "images_per_s": round(run.images_per_s, 2),
                "steady_images_per_s": round(run.steady_images_per_s, 2),
                "stage_s": round(run.stage_s, 2),
                "fit_s": round(run.fit_s, 2),
            }
            for name, run in best.items()
        },
        "images": case.num_images,
        "steps": case.steps,
        "batch_size": case.batch_size,
    }


def print_run(name: str, round_index: int, run: Run) -> None:
    print(
        f"{name:<9} round {round_index}  {run.name:<18} {run.images_per_s:9.2f} img/s   "
        f"staging {run.stage_s:7.2f} s   fit {run.fit_s:7.2f} s   steady {run.steady_images_per_s:9.2f} img/s"
    )


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'model':<9} {'configuration':<18} {'img/s':>9} {'ratio':>7} {'staging s':>10} {'fit s':>8}")
    for name, result in results.items():
        for run_name, run in result["runs"].items():
            print(
                f"{name:<9} {run_name:<18} {run['images_per_s']:>9.2f} {result['ratios'][run_name]:>7.3f} "
                f"{run['stage_s']:>10.2f} {run['fit_s']:>8.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(CASES), help=f"comma-separated, among {', '.join(CASES)}"
    )
    parser.add_argument(
        "--workers", default="0,2", help="DataLoader worker counts to try besides the default"
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown models {unknown}; choose among {list(CASES)}")
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="must-bench-training-") as tmp:
        root = Path(tmp)
        with moto_s3(root / "moto.log") as endpoint:
            for name in names:
                results[name] = bench_model(name, CASES[name], endpoint, workers, args.rounds, root)
    print_summary(results)
    summary = {
        **results,
        "torch_threads": torch.get_num_threads(),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
