"""Training images/s of one job on 1 GPU against N GPUs (data-parallel, torchrun + DDP).

    .venv/bin/python -m bench.distributed --gpus 4 --model ViT-B-16 --batch-size 256 --steps 30
    .venv/bin/python -m bench.distributed --gpus 2 --cpu --steps 6      # gloo ranks: a smoke run

Both runs start the engine's own entry point the way a user or the worker does:
`torchrun --standalone --nproc-per-node K -m services.must.cli ...` with K = 1, then K = N, on
the same images, model, global batch and schedule, from the same zero-shot start. Each step's
rate is the global batch over that step's wall time, as rank 0 records it in `metrics.jsonl`;
a run's rate is the median over its steps after `--warmup` steps (start-up, cuDNN autotuning
and the first batches' loading are left out). `scaling` = images/s on N / images/s on 1, whose
ideal is N. Model loading, view fitting and the threshold calibration are not timed: they run
once per job, before training.

`--model tiny` is the seeded tiny CLIP of bench/tiny_clip; any other name is an open_clip
architecture with random weights (the step's cost does not depend on the weights). With `--cpu`
no GPU is used (CUDA_VISIBLE_DEVICES is emptied) and the ranks run gloo on the CPU: that checks
the bench, its ratio says nothing about GPUs. Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.shapes import CLASS_NAMES, write_folder
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH

# Fixed views (the fitting pass is left out) with the reference's strong augmentation.
VIEWS = {"strong_crop_min": 0.3, "rand_augment": "rand-m9-mstd0.5-inc1", "hflip": True}


def _model_args(model: str) -> list[str]:
    if model == "tiny":
        return ["--model-config", str(CONFIG_PATH), "--checkpoint", str(CHECKPOINT_PATH)]
    return ["--model", model]


def run_once(
    processes: int, images: Path, out: Path, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    """One training run on `processes` ranks; its median images/s after the warm-up steps."""
    hparams = {**VIEWS, "threshold_mode": "fixed", "threshold": 0.5, "checkpoint_every": 10**6}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
        "-m", "services.must.cli", "--images", str(images), "--classes", ",".join(CLASS_NAMES),
        "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--hparams", json.dumps(hparams), "--quiet", *_model_args(args.model),
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_sec"] for r in records[args.warmup :]] or [records[-1]["images_per_sec"]]
    return {"processes": processes, "steps": len(records), "images_per_sec": statistics.median(rates)}


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    images = work / "images"
    write_folder("target", args.images, seed=3, out=images, size=args.image_size)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    one = run_once(1, images, work / "one", args, env)
    many = run_once(args.gpus, images, work / "many", args, env)
    return {
        "model": args.model,
        "device": "cpu (gloo)" if args.cpu else "cuda (nccl)",
        "global_batch": args.batch_size,
        "one": one,
        "many": many,
        "scaling": round(many["images_per_sec"] / one["images_per_sec"], 3),
        "ideal": args.gpus,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run (N)")
    p.add_argument("--model", default="tiny", help="'tiny' or an open_clip architecture (random weights)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, the same in both runs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--images", type=int, default=256, help="synthetic images to train on")
    p.add_argument("--image-size", type=int, default=32, help="stored image side in px (224 for ViTs)")
    p.add_argument("--cpu", action="store_true", help="gloo ranks on the CPU: a smoke run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(args, Path(tmp))
    print(f"{'run':<8}{'processes':>10}{'images/s':>12}")
    for name in ("one", "many"):
        run = result[name]
        print(f"{name:<8}{run['processes']:>10}{run['images_per_sec']:>12.1f}")
    print(f"scaling {result['scaling']:.2f}x on {args.gpus} (ideal {args.gpus}x), {result['device']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
