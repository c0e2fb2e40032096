"""`make demo`: adapt the tiny CLIP to unlabeled target-domain images, then predict.

Generates the demo data set (seeded, so every run sees the same images) under `.demo/`, runs the
engine exactly as `must-adapt` does, and prints the zero-shot and adapted top-1 on held-out
labelled images plus one example prediction.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from bench.shapes import CLASS_NAMES, iter_domain, write_folder
from bench.tiny_clip import TINY_CLIP_SPEC
from services.must.adapt import adapt, prepare
from services.must.cli import ProgressBar
from services.must.config import MustConfig
from services.must.evaluation import top1
from services.must.export import load_classifier
from services.must.trainer import TrainerHooks

DEMO_DIR = Path(".demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    images = DEMO_DIR / "unlabeled"
    print(f"writing {args.images} unlabeled target-domain images to {images}/ ...")
    write_folder("target", args.images, seed=7, out=images)

    zero_shot = prepare(TINY_CLIP_SPEC, CLASS_NAMES).classifier()
    held_out, labels = zip(*iter_domain("target", 500, seed=1002), strict=True)
    pixels, labels_t = zero_shot.preprocess(list(held_out)), torch.tensor(labels)
    before = top1(zero_shot, pixels, labels_t)

    print(f"adapting the tiny CLIP with MUST ({args.steps} steps) ...")
    bar = ProgressBar(quiet=False)
    start = time.perf_counter()
    result = adapt(
        images,
        CLASS_NAMES,
        out_dir=DEMO_DIR / "run",
        model=TINY_CLIP_SPEC,
        config=MustConfig(
            total_steps=args.steps,
            batch_size=64,
            lr=1e-4,
            strong_crop_min=0.7,
            rand_augment="rand-n2-m5-mstd0.5-inc1",
        ),
        hooks=TrainerHooks(bar),
    )
    bar.close()
    adapted = load_classifier(result.classifier_dir)
    after = top1(adapted, pixels, labels_t)
    print(f"\ntrained in {time.perf_counter() - start:.0f}s; classifier at {result.classifier_dir}")
    print(f"target-domain top-1 on 500 held-out images: zero-shot {before:.1f}%  ->  MUST {after:.1f}%")
    example = adapted.top_k(adapted.predict([held_out[0]]), 3)[0]
    shown = ", ".join(f"{p['label']} {p['probability']:.2f}" for p in example)
    print(f"example prediction (true class: {CLASS_NAMES[labels[0]]}): {shown}")


if __name__ == "__main__":
    main()
