"""A short seeded MUST run on the committed tiny CLIP lifts target-domain accuracy, without labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.shapes import CLASS_NAMES, iter_domain, write_folder
from bench.tiny_clip import TINY_CLIP_SPEC
from services.must.adapt import list_images, prepare, start
from services.must.config import MustConfig
from services.must.data import SkipReport
from services.must.evaluation import top1
from services.must.export import load_classifier
from services.must.inference import ImageClassifier
from services.must.network import MustNetwork


@pytest.mark.slow
def test_short_run_raises_target_accuracy(tmp_path: Path) -> None:
    write_folder("target", 800, seed=11, out=tmp_path / "images")
    paths, _ = list_images(tmp_path / "images")
    zero_shot = prepare(TINY_CLIP_SPEC, CLASS_NAMES).classifier()
    images, labels = zip(*iter_domain("target", 500, seed=1002), strict=True)
    pixels, targets = zero_shot.preprocess(list(images)), torch.tensor(labels)
    before = top1(zero_shot, pixels, targets)

    # The defaults on a schedule short enough for a test (the default for 800 images is 750 steps).
    schedule = {"total_steps": 100, "lr": 1e-4, "ema_start": 0.99, "ema_end": 0.995}
    run = start(paths, CLASS_NAMES, model=TINY_CLIP_SPEC, config=MustConfig(**schedule), device="cpu")
    fit = run.train(tmp_path / "checkpoints")
    run.export(tmp_path / "classifier", fit, SkipReport())

    def score(network: MustNetwork) -> float:
        classifier = ImageClassifier.from_network(network, CLASS_NAMES, run.prepared.clip.preprocess)
        return top1(classifier, pixels, targets)

    student = score(run.task.student)
    served = top1(load_classifier(tmp_path / "classifier"), pixels, targets)
    assert 30.0 < before < 75.0, "the target domain must start with a real zero-shot gap"
    assert student >= before + 2.0, f"student {student:.1f} did not improve on zero-shot {before:.1f}"
    # The label-free guard never serves a classifier below zero-shot here.
    assert run.decision is not None
    assert served >= before, f"served {run.decision.served} at {served:.1f} < zero-shot {before:.1f}"
