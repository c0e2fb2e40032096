"""The instant method end to end on the pretrained shapes CLIP: features, cache, guard, export,
serving unseen images, progress, cancellation, and a MUST run warm-started from its head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.shapes import CLASS_NAMES, iter_domain
from bench.tiny_clip import TINY_CLIP_SPEC
from services.must.adapt import start
from services.must.config import MustConfig
from services.must.data import Labelled, SkipReport
from services.must.errors import Cancelled, CheckpointError
from services.must.export import load_classifier
from services.must.guard import ZERO_SHOT
from services.must.instant import (
    INSTANT,
    FolderFeatureCache,
    InstantRun,
    features_from_bytes,
    features_to_bytes,
    start_instant,
)
from services.must.trainer import StepMetrics, TrainerHooks
from services.must.transductive import InstantConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

IMAGES = 120
# Fewer distillation steps than the frozen 200: the tests check behaviour, not accuracy.
QUICK = InstantConfig(distill_steps=40)


def _write(folder: Path, count: int, seed: int) -> tuple[list[Path], list[int]]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for i, (image, label) in enumerate(iter_domain("target", count, seed=seed)):
        path = folder / f"{i:04d}.png"
        image.save(path)
        paths.append(path)
        labels.append(label)
    return paths, labels


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _write(tmp_path_factory.mktemp("unlabeled"), IMAGES, seed=5)[0]


def _run(paths: list[Path], cache: Path, hooks: TrainerHooks | None = None) -> InstantRun:
    run = start_instant(
        paths,
        CLASS_NAMES,
        model=TINY_CLIP_SPEC,
        templates=["a photo of a {}."],
        config=MustConfig(guard_images=64),
        instant=QUICK,
        device="cpu",
        cache=FolderFeatureCache(cache),
    )
    run.train(hooks=hooks)
    return run


def test_instant_run_exports_a_classifier_that_serves_unseen_images(
    images: list[Path], tmp_path: Path
) -> None:
    run = _run(images, tmp_path / "cache")
    decision = run.choose()
    manifest = run.export(tmp_path / "classifier", run.train(), SkipReport())

    assert [c.name for c in decision.candidates] == [ZERO_SHOT, INSTANT]
    assert manifest.network == decision.served
    assert manifest.metrics["method"] == INSTANT
    assert len(run.guard_paths) == 64
    assert run.seen[INSTANT].features.shape[0] == 64
    served = load_classifier(tmp_path / "classifier")
    expected = run.served_classifier(decision)
    assert torch.equal(served.head, expected.head)
    # New images, never seen by the fit: the served artifact classifies them as the run's classifier does.
    unseen, _ = _write(tmp_path / "unseen", 16, seed=99)
    pixels = served.preprocess([Image.open(p) for p in unseen])
    assert torch.allclose(served.predict(pixels), expected.predict(pixels), atol=1e-5)
    # The head moved away from the text head; the image tower did not change.
    assert not torch.allclose(run.instant_classifier().head, run.zero_shot_classifier().head)
    zs_tower = run.zero_shot_classifier().visual.state_dict()
    assert all(torch.equal(v, zs_tower[k]) for k, v in served.visual.state_dict().items())


def test_second_run_reads_the_cached_features_and_fits_the_same_head(
    images: list[Path], tmp_path: Path
) -> None:
    first = _run(images, tmp_path / "cache")
    second = _run(images, tmp_path / "cache")
    other_images = _run(images[:-1], tmp_path / "cache")

    assert (first.cache_hit, second.cache_hit, other_images.cache_hit) == (False, True, False)
    assert first.features is not None
    assert second.features is not None
    assert torch.equal(first.features, second.features)
    assert first.head is not None
    assert second.head is not None
    assert torch.allclose(first.head, second.head)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2


def test_damaged_or_mismatched_cached_features_are_refused() -> None:
    data = features_to_bytes(torch.ones(3, 4))

    assert features_from_bytes(data, 3).dtype == torch.float32
    with pytest.raises(CheckpointError, match="expected 5 rows"):
        features_from_bytes(data, 5)
    with pytest.raises(CheckpointError, match="unreadable"):
        features_from_bytes(b"not safetensors", 3)


def test_progress_counts_every_phase_and_cancel_stops_the_run(images: list[Path], tmp_path: Path) -> None:
    steps: list[StepMetrics] = []
    _run(images, tmp_path / "a", TrainerHooks(on_step=steps.append))

    total = 1 + QUICK.iterations + QUICK.distill_steps  # 120 images: one batch of the feature pass
    assert steps[-1].step == steps[-1].total_steps == total
    assert [m.step for m in steps] == sorted({m.step for m in steps})
    assert "distill" in steps[-1].losses

    calls = iter(range(1000))
    with pytest.raises(Cancelled):
        _run(images, tmp_path / "b", TrainerHooks(should_cancel=lambda: next(calls) >= 3))


def test_must_warm_started_from_the_instant_head(images: list[Path], tmp_path: Path) -> None:
    instant = _run(images, tmp_path / "cache")
    assert instant.head is not None
    config = MustConfig(total_steps=2, batch_size=8, guard_images=32, checkpoint_every=10)
    common = {"model": TINY_CLIP_SPEC, "templates": ["a photo of a {}."], "config": config, "device": "cpu"}

    cold = start(images, CLASS_NAMES, **common)  # type: ignore[arg-type]
    warm = start(images, CLASS_NAMES, initial_head=instant.head, **common)  # type: ignore[arg-type]

    assert torch.equal(warm.task.student.head.detach(), instant.head)
    assert torch.equal(warm.task.teacher.module.head.detach(), instant.head)  # type: ignore[union-attr]
    # The guard still compares with the zero-shot classifier the user started from.
    assert torch.equal(warm.seen[ZERO_SHOT].probs, cold.seen[ZERO_SHOT].probs)
    assert not torch.equal(warm.zero_shot_classifier().head, instant.head)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Labelled:
    """Two labelled target images per shape class (another seed than the unlabeled ones)."""
    folder = tmp_path_factory.mktemp("labelled")
    paths, labels = _write(folder, 60, seed=11)
    chosen = [next(i for i, y in enumerate(labels) if y == k) for k in range(len(CLASS_NAMES))]
    chosen += [max(i for i, y in enumerate(labels) if y == k) for k in range(len(CLASS_NAMES))]
    return Labelled([paths[i] for i in chosen], [labels[i] for i in chosen])


def test_few_label_instant_fit_keeps_the_labels_and_reports_them(
    images: list[Path], labelled: Labelled, tmp_path: Path
) -> None:
    run = start_instant(
        images,
        CLASS_NAMES,
        model=TINY_CLIP_SPEC,
        templates=["a photo of a {}."],
        config=MustConfig(guard_images=64),
        instant=QUICK,
        device="cpu",
        labelled=labelled,
    )
    steps: list[StepMetrics] = []
    result = run.train(hooks=TrainerHooks(on_step=steps.append))
    manifest = run.export(tmp_path / "classifier", result, SkipReport())

    assert steps[-1].total_steps == 1 + 1 + QUICK.iterations + QUICK.distill_steps  # two feature passes
    assert manifest.metrics["labelled"] == {"images": 20, "per_class": [2] * len(CLASS_NAMES)}
    assert run.features is not None
    assert run.features.shape[0] == IMAGES  # the guard and the cache see the unlabeled images only
    head = run.instant_classifier()
    pixels = head.preprocess([Image.open(p) for p in labelled.paths])
    # Fitted with the labelled images' rows fixed: the head reproduces most of their labels.
    agree = (head.predict(pixels).argmax(1) == torch.tensor(labelled.labels)).float().mean()
    assert agree >= 0.8


def test_few_label_must_starts_from_prototypes_and_adds_a_supervised_loss(
    images: list[Path], labelled: Labelled, tmp_path: Path
) -> None:
    config = MustConfig(total_steps=2, batch_size=8, guard_images=32, checkpoint_every=10)
    common = {"model": TINY_CLIP_SPEC, "templates": ["a photo of a {}."], "config": config, "device": "cpu"}
    plain = start(images, CLASS_NAMES, **common)  # type: ignore[arg-type]
    run = start(images, CLASS_NAMES, labelled=labelled, **common)  # type: ignore[arg-type]

    assert not torch.allclose(run.task.student.head, plain.task.student.head)
    assert torch.equal(run.seen[ZERO_SHOT].probs, plain.seen[ZERO_SHOT].probs)  # the guard's reference
    assert run.task.labelled is not None
    first, again = run.task.labelled.batch(0), run.task.labelled.batch(0)
    assert first[0].shape == (4, 3, 32, 32)
    assert torch.equal(first[0], again[0])
    assert torch.equal(first[1], again[1])
    fit = run.train(tmp_path / "checkpoints")
    assert fit.history[-1]["supervised"] > 0
    assert fit.last is not None
    assert "supervised" in fit.last.losses
    assert "supervised" not in plain.train(tmp_path / "plain").history[-1]
    manifest = run.export(tmp_path / "classifier", fit, SkipReport())
    assert manifest.metrics["labelled"]["images"] == 20
