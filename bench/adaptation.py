"""Offline proof that MUST lifts a zero-shot classifier without labels.

    .venv/bin/python -m bench.adaptation [--steps 300] [--no-ablations]

The tiny CLIP (bench/tiny_clip, pretrained on the SOURCE domain only) is adapted with MUST on
unlabeled TARGET images written to a folder, through the same start/train/export steps that
`adapt()`, the CLI and the worker run; labels are used only to score held-out target images.
The exported classifier is the EMA teacher; the student's top-1 is printed beside it. Prints a
table of top-1 accuracies and run times, then, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.shapes import CLASS_NAMES, iter_domain, write_folder
from bench.tiny_clip import TARGET_TEST_SEED, TINY_CLIP_HPARAMS, TINY_CLIP_SPEC
from services.must.adapt import list_images, prepare, start
from services.must.config import MustConfig
from services.must.evaluation import top1
from services.must.export import load_classifier
from services.must.inference import ImageClassifier

ABLATIONS: dict[str, dict[str, Any]] = {
    "self-training only": {"fairness_weight": 0.0, "mim_weight": 0.0, "align_weight": 0.0, "mask_ratio": 0.0},
    "MUST without fairness": {"fairness_weight": 0.0},
    "MUST, fixed threshold 0.5": {"threshold_mode": "fixed", "threshold": 0.5},
}


@dataclass
class Row:
    name: str
    top1: float
    seconds: float
    note: str = ""


def labelled_set(
    clf: ImageClassifier, domain: str, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*iter_domain(domain, count, seed), strict=True)
    return clf.preprocess(list(images)), torch.tensor(labels)


def run_must(
    name: str, train_dir: Path, work: Path, base: MustConfig, overrides: dict[str, Any], test: tuple
) -> Row:
    config = MustConfig.from_dict({**base.to_dict(), **overrides})
    began = time.perf_counter()
    out = work / name.replace(" ", "_")
    paths, skipped = list_images(train_dir)
    run = start(paths, CLASS_NAMES, model=TINY_CLIP_SPEC, config=config)
    fit = run.train(out / "checkpoints")
    run.export(out / "classifier", fit, skipped)
    seconds = time.perf_counter() - began
    student = top1(run.prepared.classifier(run.task.student), *test)
    last = fit.history[-1]
    note = f"student={student:.1f} tau={run.threshold[0]:.2f} confident={last['confident_fraction']:.2f}"
    return Row(name, top1(load_classifier(out / "classifier"), *test), seconds, note)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-images", type=int, default=3000, help="unlabeled target images")
    parser.add_argument("--test-images", type=int, default=1000, help="held-out labelled images per domain")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target-test-seed",
        type=int,
        default=TARGET_TEST_SEED,
        help="which held-out target images score the runs; choose settings on another seed than the report's",
    )
    parser.add_argument(
        "--threshold-quantile",
        type=float,
        default=TINY_CLIP_HPARAMS["threshold_quantile"],
        help="label-free tau: this quantile of the zero-shot teacher's confidences on the images",
    )
    parser.add_argument("--no-ablations", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    total_start = time.perf_counter()
    base = MustConfig.from_dict(
        TINY_CLIP_HPARAMS
        | {
            "total_steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "threshold_quantile": args.threshold_quantile,
        }
    )

    zero_shot = prepare(TINY_CLIP_SPEC, CLASS_NAMES).classifier()
    source_test = labelled_set(zero_shot, "source", args.test_images, seed=1001)
    target_test = labelled_set(zero_shot, "target", args.test_images, seed=args.target_test_seed)
    rows = [
        Row("zero-shot, source domain", top1(zero_shot, *source_test), 0.0),
        Row("zero-shot, target domain", top1(zero_shot, *target_test), 0.0),
    ]
    with tempfile.TemporaryDirectory(prefix="must-bench-") as tmp:
        work = Path(tmp)
        write_folder("target", args.train_images, seed=7, out=work / "unlabeled")
        rows.append(run_must("MUST", work / "unlabeled", work, base, {}, target_test))
        if not args.no_ablations:
            for name, overrides in ABLATIONS.items():
                rows.append(run_must(name, work / "unlabeled", work, base, overrides, target_test))

    print(
        f"\nMUST on the tiny CLIP: {args.train_images} unlabeled target images, {args.steps} steps of "
        f"batch {args.batch_size}, lr {args.lr}; top-1 on {args.test_images} held-out images\n"
    )
    print(f"{'run':<30} {'top-1':>7} {'time (s)':>9}  notes")
    for row in rows:
        print(f"{row.name:<30} {row.top1:>7.1f} {row.seconds:>9.1f}  {row.note}")
    must = rows[2].top1
    summary = {
        "source_zero_shot_top1": round(rows[0].top1, 2),
        "target_zero_shot_top1": round(rows[1].top1, 2),
        "must_top1": round(must, 2),
        "gain": round(must - rows[1].top1, 2),
        "ablations": {row.name: round(row.top1, 2) for row in rows[3:]},
        "must_seconds": round(rows[2].seconds, 1),
        "total_seconds": round(time.perf_counter() - total_start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
