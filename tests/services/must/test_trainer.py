"""Training loop: progress, checkpoints, cancellation and exact resume on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.shapes import write_folder
from services.must.adapt import adapt
from services.must.checkpoint import read_latest
from services.must.config import MustConfig
from services.must.errors import Cancelled
from services.must.loading import ModelSpec
from services.must.trainer import StepMetrics, TrainerHooks

CLASSES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_folder("target", 40, seed=3, out=folder)
    return folder


def _config(**overrides: object) -> MustConfig:
    values = {"total_steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2, "seed": 5}
    return MustConfig.from_dict({**values, **overrides})


def _state(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    return {k: v for k, v in tensors.items() if k.startswith(("task.", "teacher.", "optim."))}


def test_progress_and_checkpoints(micro_clip: ModelSpec, images: Path, tmp_path: Path) -> None:
    seen: list[StepMetrics] = []
    adapt(
        images, CLASSES, out_dir=tmp_path, model=micro_clip, config=_config(), hooks=TrainerHooks(seen.append)
    )
    assert [m.step for m in seen] == [1, 2, 3, 4, 5, 6]
    assert all(m.total_steps == 6 for m in seen)
    # The rate is one batch over that step's own wall time (elapsed between consecutive steps).
    for before, after in zip(seen, seen[1:], strict=False):
        assert after.images_per_sec * (after.elapsed_s - before.elapsed_s) == pytest.approx(8, rel=1e-3)
    assert {"loss", "self_training", "fairness", "mim", "align"} <= set(seen[-1].losses)
    assert {"confident_fraction", "agreement", "mean_pred_entropy"} <= set(seen[-1].stats)
    assert all(torch.isfinite(torch.tensor(list(m.losses.values()))).all() for m in seen)
    latest = read_latest(tmp_path / "checkpoints")
    assert latest is not None
    assert latest["step"] == 6
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.safetensors"))
    assert kept == ["step-000004.safetensors", "step-000006.safetensors"]
    manifest = json.loads((tmp_path / "classifier" / "manifest.json").read_text())
    assert manifest["class_names"] == CLASSES
    guard = manifest["metrics"]["guard"]
    assert manifest["network"] == guard["served"]
    names = [c["name"] for c in guard["candidates"]]
    # Zero-shot, the teacher at a quarter, half and three quarters of the 6 steps, and both at the end.
    assert names == ["zero_shot", "teacher@2", "teacher@3", "teacher@4", "teacher", "student"]
    assert guard["reason"]
    predictions = manifest["metrics"]["predictions"]
    assert predictions["images"] == 40  # the guard sample is every image when there are few
    counts = predictions["class_counts"]
    assert set(counts) == {"zero_shot", guard["served"]}
    assert all(len(c) == len(CLASSES) and sum(c) == 40 for c in counts.values())
    quantiles = list(predictions["confidence_quantiles"].values())
    assert quantiles == sorted(quantiles)
    assert 1 / len(CLASSES) <= quantiles[0] <= 1.0


def test_cancel_then_resume_matches_uninterrupted_run(
    micro_clip: ModelSpec, images: Path, tmp_path: Path
) -> None:
    full = tmp_path / "full"
    adapt(images, CLASSES, out_dir=full, model=micro_clip, config=_config())

    interrupted = tmp_path / "interrupted"
    steps_before: list[int] = []

    def cancel_at_three() -> bool:
        return len(steps_before) == 3

    hooks = TrainerHooks(on_step=lambda m: steps_before.append(m.step), should_cancel=cancel_at_three)
    with pytest.raises(Cancelled):
        adapt(images, CLASSES, out_dir=interrupted, model=micro_clip, config=_config(), hooks=hooks)
    assert read_latest(interrupted / "checkpoints")["step"] == 3

    resumed_steps: list[int] = []
    adapt(
        images,
        CLASSES,
        out_dir=interrupted,
        model=micro_clip,
        config=_config(),
        hooks=TrainerHooks(on_step=lambda m: resumed_steps.append(m.step)),
    )
    assert resumed_steps == [4, 5, 6]

    expected = _state(full / "checkpoints" / "step-000006.safetensors")
    actual = _state(interrupted / "checkpoints" / "step-000006.safetensors")
    assert expected.keys() == actual.keys()
    assert any(k.startswith("teacher.") for k in expected)
    assert any(k.startswith("optim.") for k in expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)
    before = load_file(str(micro_clip.checkpoint))["visual.conv1.weight"]
    assert not torch.allclose(expected["task.student.visual.conv1.weight"], before), (
        "training changed nothing"
    )


def test_resume_refuses_a_corrupt_checkpoint(micro_clip: ModelSpec, images: Path, tmp_path: Path) -> None:
    adapt(images, CLASSES, out_dir=tmp_path, model=micro_clip, config=_config(total_steps=2))
    weights = tmp_path / "checkpoints" / "step-000002.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    from services.must.errors import CheckpointError

    with pytest.raises(CheckpointError, match="checksum"):
        adapt(images, CLASSES, out_dir=tmp_path, model=micro_clip, config=_config(total_steps=4))


@pytest.mark.parametrize(("precision", "tower_dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_reaches_the_training_step(
    micro_clip: ModelSpec, images: Path, tmp_path: Path, precision: str, tower_dtype: torch.dtype
) -> None:
    """The transformer runs in the configured precision in training; logits and losses stay fp32."""
    from services.must.adapt import list_images, start
    from services.must.trainer import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    paths, _ = list_images(images)
    config = _config(total_steps=2, precision=precision)
    run = start(paths, CLASSES, model=micro_clip, config=config, device="cpu")
    seen: list[StepMetrics] = []
    dtypes: list[torch.dtype] = []
    transformer = run.task.student.visual.transformer
    handle = transformer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        run.train(tmp_path / "checkpoints", TrainerHooks(seen.append))
    finally:
        handle.remove()
    assert len(seen) == 2
    assert all(torch.isfinite(torch.tensor(list(m.losses.values()))).all() for m in seen)
    assert dtypes
    assert set(dtypes) == {tower_dtype}


def test_a_resumed_run_keeps_the_views_its_checkpoint_trained_with(
    micro_clip: ModelSpec, images: Path, tmp_path: Path
) -> None:
    from services.must.adapt import list_images, start

    chosen = {"strong_crop_min": 0.5, "rand_augment": "rand-n2-m7-mstd0.5-inc1", "hflip": False}
    adapt(images, CLASSES, out_dir=tmp_path, model=micro_clip, config=_config(total_steps=2, **chosen))
    paths, _ = list_images(images)

    fresh = start(paths, CLASSES, model=micro_clip, config=_config(total_steps=4), device="cpu")
    resumed = start(
        paths,
        CLASSES,
        model=micro_clip,
        config=_config(total_steps=4),
        device="cpu",
        checkpoint_dir=tmp_path / "checkpoints",
    )

    assert fresh.views is not None  # fitted: the config left the views to the job
    assert (fresh.config.strong_crop_min, fresh.config.rand_augment) != (0.5, chosen["rand_augment"])
    assert resumed.config.strong_crop_min == 0.5
    assert resumed.config.rand_augment == chosen["rand_augment"]
    assert resumed.config.hflip is False


def test_a_snapshot_kept_before_a_resume_can_still_be_served_and_described(
    micro_clip: ModelSpec, images: Path, tmp_path: Path
) -> None:
    from services.must.adapt import list_images, start
    from services.must.guard import CandidateScore

    adapt(images, CLASSES, out_dir=tmp_path, model=micro_clip, config=_config(total_steps=4))
    paths, _ = list_images(images)
    run = start(paths, CLASSES, model=micro_clip, config=_config(total_steps=4), device="cpu")
    run.train(tmp_path / "checkpoints")  # restores everything, trains nothing: the run was complete
    assert [s.name for s in run.snapshots.scores()] == ["teacher@1", "teacher@2", "teacher@3"]
    assert "teacher@2" not in run.seen  # scored by the interrupted process, not this one
    best = CandidateScore("teacher@2", 2, 1.0, 0.5, 0.5, 0.5, 1.0)
    assert run.snapshots.offer(1, best, run.task.teacher.module, 0.0)

    decision = run.choose()

    assert decision.served == "teacher@2"
    summary = run.predictions(decision)
    assert set(summary["class_counts"]) == {"zero_shot", "teacher@2"}
    assert sum(summary["class_counts"]["teacher@2"]) == 40
