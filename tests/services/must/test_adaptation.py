"""A short seeded MUST run on the committed tiny CLIP lifts target-domain accuracy, without labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.shapes import CLASS_NAMES, iter_domain, write_folder
from bench.tiny_clip import TINY_CLIP_HPARAMS, TINY_CLIP_SPEC
from services.must.adapt import list_images, prepare, start
from services.must.config import MustConfig
from services.must.evaluation import top1
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

    schedule = {"total_steps": 80, "batch_size": 64, "lr": 1e-4, "ema_start": 0.99, "ema_end": 0.995}
    config = MustConfig.from_dict(TINY_CLIP_HPARAMS | schedule)
    run = start(paths, CLASS_NAMES, model=TINY_CLIP_SPEC, config=config, device="cpu")
    run.train(tmp_path / "checkpoints")

    def score(network: MustNetwork) -> float:
        classifier = ImageClassifier.from_network(network, CLASS_NAMES, run.prepared.clip.preprocess)
        return top1(classifier, pixels, targets)

    student, teacher = score(run.task.student), score(run.task.teacher.module)
    assert 30.0 < before < 75.0, "the target domain must start with a real zero-shot gap"
    assert student >= before + 2.0, f"student {student:.1f} did not improve on zero-shot {before:.1f}"
    assert teacher >= before - 1.0, f"teacher {teacher:.1f} fell below zero-shot {before:.1f}"
