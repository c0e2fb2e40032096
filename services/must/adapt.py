"""The library entry point: adapt a CLIP to a folder (or list) of unlabeled images.

    result = adapt(Path("images/"), ["cat", "dog"], out_dir=Path("run/"), model=ModelSpec(...))
    classifier = load_classifier(result.classifier_dir)

Steps: scan the images, resolve the label-free defaults, build the zero-shot head, choose the
confidence threshold from the zero-shot teacher, train (resuming from `out_dir/checkpoints`),
and export the teacher as the served classifier (the EMA teacher is the steadier of the two
networks, and picking it needs no labels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from services.must.calibration import choose_threshold, teacher_confidence
from services.must.classifier import validate_class_names, validate_templates
from services.must.config import MustConfig, resolve
from services.must.data import ImageListDataset, SkipReport, scan_folder
from services.must.errors import DatasetError
from services.must.export import Manifest, export_classifier
from services.must.inference import ImageClassifier
from services.must.loading import LoadedClip, ModelSpec, load_clip
from services.must.network import MustNetwork
from services.must.task import MustTask
from services.must.trainer import FitResult, TrainerHooks, fit, loader_workers
from services.must.transforms import TwoViews, eval_transform

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 2048


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _identity(image: Image.Image) -> Image.Image:
    return image


class PathViews(Dataset):
    """(index, seed) -> (weak, strong) views of image files; unreadable files fall back to the next one."""

    def __init__(self, paths: Sequence[Path], views: TwoViews) -> None:
        self.images = ImageListDataset(paths, transform=_identity)
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        image, _ = self.images[index]
        return self.views(image, seed)


@dataclass
class Prepared:
    """A zero-shot starting point: the network to train and what the export needs to describe it."""

    clip: LoadedClip
    network: MustNetwork
    class_names: list[str]
    templates: list[str]
    spec: ModelSpec

    def classifier(self, network: MustNetwork | None = None) -> ImageClassifier:
        return ImageClassifier.from_network(network or self.network, self.class_names, self.clip.preprocess)

    def source_model(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "arch": spec.arch,
            "pretrained": spec.pretrained,
            "checkpoint": spec.checkpoint,
            "config": spec.config if isinstance(spec.config, str) else None,
        }


def prepare(
    spec: ModelSpec,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> Prepared:
    """Load the CLIP, build the text head and release the text tower."""
    names = validate_class_names(class_names)
    prompts = validate_templates(templates)
    clip = load_clip(spec, device)
    zero_shot = ImageClassifier.zero_shot(clip, names, prompts, device=device)
    network = MustNetwork(clip.visual, zero_shot.head, clip.logit_scale).to(device)
    return Prepared(clip, network, names, prompts, spec)


def calibrate(
    prepared: Prepared, paths: Sequence[Path], cfg: MustConfig, device: torch.device
) -> torch.Tensor:
    """The label-free confidence threshold (see `calibration`), from up to 2048 images."""
    if cfg.threshold_mode == "fixed":
        return choose_threshold(
            torch.zeros(1), torch.zeros(1, dtype=torch.long), prepared.network.num_classes, cfg
        )
    step = max(1, len(paths) // CALIBRATION_IMAGES)
    subset = list(paths)[::step][:CALIBRATION_IMAGES]
    data = ImageListDataset(subset, eval_transform(prepared.clip.preprocess))
    workers = loader_workers(cfg, device)
    loader = DataLoader(data, batch_size=128, num_workers=workers, pin_memory=device.type == "cuda")
    batches = (x for x, _ in loader)
    conf, pred = teacher_confidence(prepared.network, batches, device)
    return choose_threshold(conf, pred, prepared.network.num_classes, cfg)


@dataclass
class Adaptation:
    """One MUST run, set up from unlabeled images: the steps `adapt()` runs, for callers that
    put their own work between them (the worker restores a stored checkpoint before `train`).

    Keeping the setup in one place matters for resume: a resumed run must seed, calibrate and
    build its views exactly as the interrupted one did.
    """

    prepared: Prepared
    task: MustTask
    config: MustConfig
    paths: list[Path]
    device: torch.device

    @property
    def threshold(self) -> list[float]:
        return self.task.threshold.flatten().tolist()

    def train(self, checkpoint_dir: Path, hooks: TrainerHooks | None = None) -> FitResult:
        """Run the schedule, resuming from `checkpoint_dir/latest.json` when there is one."""
        cfg = self.config
        views = TwoViews(self.prepared.clip.preprocess, cfg.strong_crop_min, cfg.rand_augment)
        return fit(
            self.task,
            PathViews(self.paths, views),
            cfg,
            device=self.device,
            checkpoint_dir=checkpoint_dir,
            hooks=hooks,
        )

    def export(
        self,
        out_dir: Path,
        result: FitResult,
        skipped: SkipReport,
        source_model: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write the EMA teacher as the served classifier, with the run's label-free metrics."""
        metrics = {
            "images_used": len(self.paths),
            "images_skipped": skipped.to_dict(),
            "threshold": self.threshold,
            "last_step": result.history[-1] if result.history else {},
        }
        return export_classifier(
            self.prepared.classifier(self.task.teacher.module),
            out_dir,
            model_cfg=self.prepared.clip.model_cfg,
            templates=self.prepared.templates,
            source_model=source_model or self.prepared.source_model(),
            metrics=metrics,
        )


def start(
    paths: Sequence[Path],
    class_names: Sequence[str],
    *,
    model: ModelSpec,
    templates: Sequence[str] | None = None,
    config: MustConfig | None = None,
    device: torch.device | str | None = None,
) -> Adaptation:
    """Resolve the defaults for these images, load the CLIP and choose the threshold without labels."""
    device = torch.device(device) if device is not None else default_device()
    cfg = resolve((config or MustConfig()).validate(), len(paths))
    torch.manual_seed(cfg.seed)
    prepared = prepare(model, class_names, templates, device)
    # Calibration is deterministic (eval transform, zero-shot weights), so a resumed run simply
    # recomputes the same threshold before the checkpoint restores everything else.
    threshold = calibrate(prepared, paths, cfg, device)
    task = MustTask(prepared.network, cfg, threshold.to(device))
    return Adaptation(prepared, task, cfg, list(paths), device)


@dataclass
class AdaptResult:
    classifier_dir: Path
    manifest: Manifest
    fit: FitResult
    config: MustConfig
    num_images: int
    skipped: SkipReport
    threshold: list[float] = field(default_factory=list)


def list_images(
    images: Path | Sequence[Path], max_images: int | None = None
) -> tuple[list[Path], SkipReport]:
    """Readable image files and a report of what was skipped; DatasetError when none are left."""
    if isinstance(images, Path | str):
        try:
            paths, skipped = scan_folder(Path(images), max_images=max_images)
        except FileNotFoundError as exc:
            raise DatasetError(str(exc)) from exc
    else:
        paths, skipped = list(images)[:max_images], SkipReport()
    if not paths:
        detail = f" (skipped {skipped.total}: {skipped.counts})" if skipped.total else ""
        raise DatasetError(f"no readable images found in {images}{detail}")
    return paths, skipped


def adapt(
    images: Path | Sequence[Path],
    class_names: Sequence[str],
    *,
    out_dir: Path,
    model: ModelSpec,
    templates: Sequence[str] | None = None,
    config: MustConfig | None = None,
    device: torch.device | str | None = None,
    hooks: TrainerHooks | None = None,
    max_images: int | None = None,
) -> AdaptResult:
    """Run MUST end to end on local images and export the adapted classifier to `out_dir/classifier`."""
    paths, skipped = list_images(images, max_images)
    run = start(paths, class_names, model=model, templates=templates, config=config, device=device)
    result = run.train(out_dir / "checkpoints", hooks)
    manifest = run.export(out_dir / "classifier", result, skipped)
    return AdaptResult(
        out_dir / "classifier", manifest, result, run.config, len(paths), skipped, run.threshold
    )
