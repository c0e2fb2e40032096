"""The library entry point: adapt a CLIP to a folder (or list) of unlabeled images.

    result = adapt(Path("images/"), ["cat", "dog"], out_dir=Path("run/"), model=ModelSpec(...))
    classifier = load_classifier(result.classifier_dir)

Steps: scan the images, resolve the label-free defaults, build the zero-shot head, fit the
student's views and choose the confidence threshold from the zero-shot teacher, score the
zero-shot classifier for the guard, train (resuming from `out_dir/checkpoints`, scoring the
teacher at the guard points), and export the classifier the guard chooses: the EMA teacher,
the student, a snapshot of the teacher, or the zero-shot classifier itself when no adapted one
beats it (see `guard`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from services.must.calibration import choose_threshold, teacher_confidence
from services.must.checkpoint import read_latest
from services.must.classifier import validate_class_names, validate_templates
from services.must.config import MustConfig, resolve
from services.must.data import Labelled, LabelledBatches, SkipReport, scan_folder
from services.must.distributed import gather_uneven, rank_device, world
from services.must.errors import ConfigError, DatasetError
from services.must.evaluation import score_classifier
from services.must.export import Manifest, export_classifier
from services.must.guard import (
    GUARD_POINTS,
    ZERO_SHOT,
    Decision,
    Guard,
    Outputs,
    SnapshotMemory,
    decide,
    outputs_of,
)
from services.must.inference import ImageClassifier
from services.must.loading import LoadedClip, ModelSpec, load_clip
from services.must.network import MustNetwork
from services.must.task import MustTask
from services.must.trainer import FitResult, StepMetrics, TrainerHooks, autocast_dtype, fit, loader_workers
from services.must.transductive import prototype_head
from services.must.transforms import TwoViews, eval_transform, seeded, weak_transform
from services.must.views import (
    SAMPLE_IMAGES,
    PathViews,
    ViewFit,
    ViewFitter,
    fit_views,
    sample_paths,
    seeded_batches,
)

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 2048
# The student's view fields that `fit_views` fills when the config leaves them None.
_VIEW_FIELDS = ("strong_crop_min", "rand_augment", "hflip")

__all__ = ["PathViews", "adapt", "start", "prepare", "Adaptation", "AdaptResult", "list_images"]


def default_device() -> torch.device:
    """This rank's GPU in a distributed run, else the GPU if there is one, else the CPU."""
    if world().active:
        return rank_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Seedless:
    """A one-image transform called as views(image, seed); picklable for DataLoader workers."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        return self.transform(image)


class _WeakView:
    """The teacher's weak view of training, seeded per image (see transforms.seeded)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        return seeded(lambda: self.transform(image), seed)


@dataclass
class Prepared:
    """A zero-shot starting point: the network to train and what the export needs to describe it."""

    clip: LoadedClip
    network: MustNetwork
    class_names: list[str]
    templates: list[str]
    spec: ModelSpec
    descriptions: dict[str, str] = field(default_factory=dict)

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
    descriptions: Mapping[str, str] | None = None,
) -> Prepared:
    """Load the CLIP, build the text head (with the class descriptions) and release the text tower."""
    names = validate_class_names(class_names)
    prompts = validate_templates(templates)
    clip = load_clip(spec, device)
    zero_shot = ImageClassifier.zero_shot(clip, names, prompts, device=device, descriptions=descriptions)
    network = MustNetwork(clip.visual, zero_shot.head, clip.logit_scale).to(device)
    return Prepared(clip, network, names, prompts, spec, dict(descriptions or {}))


def _batches(
    paths: Sequence[Path],
    views: Callable[[Image.Image, int], Any],
    cfg: MustConfig,
    device: torch.device,
    positions: Sequence[int] | None = None,
) -> Iterable[Any]:
    workers = loader_workers(cfg, device)
    return seeded_batches(
        paths, views, cfg.seed, workers=workers, pin=device.type == "cuda", positions=positions
    )


@torch.no_grad()
def calibrate(
    prepared: Prepared, paths: Sequence[Path], cfg: MustConfig, device: torch.device
) -> torch.Tensor:
    """The label-free confidence threshold (see `calibration`), from up to 2048 images.

    Measured as training thresholds: the teacher's fp32 probabilities on its weak view, with
    the network under the same autocast as training. In a distributed run each rank scores
    every W-th image of the sample (with the view seed it has in the whole sample) and the
    ranks gather all the scores, so every rank chooses the threshold one process would.
    """
    k = prepared.network.num_classes
    if cfg.threshold_mode == "fixed":
        return choose_threshold(torch.zeros(1), torch.zeros(1, dtype=torch.long), k, cfg)
    views = _WeakView(weak_transform(prepared.clip.preprocess))
    sample = sample_paths(paths, CALIBRATION_IMAGES)
    w = world()
    batches = _batches(sample, views, cfg, device, positions=range(w.rank, len(sample), w.size))
    dtype = autocast_dtype(cfg.precision, device)
    conf, pred = teacher_confidence(prepared.network, batches, device, dtype)
    # To the device and back: nccl moves CUDA tensors only.
    conf, pred = gather_uneven(conf.to(device)).cpu(), gather_uneven(pred.to(device)).cpu()
    return choose_threshold(conf, pred, k, cfg)


def fit_student_views(
    prepared: Prepared, paths: Sequence[Path], cfg: MustConfig, device: torch.device
) -> tuple[MustConfig, ViewFit | None]:
    """Fill the view fields the config leaves None from the zero-shot model (see `views`)."""
    if all(getattr(cfg, name) is not None for name in _VIEW_FIELDS):
        return cfg, None
    fitter = ViewFitter(
        prepared.network,
        prepared.clip.preprocess,
        sample_paths(paths, SAMPLE_IMAGES),
        mask_ratio=cfg.mask_ratio,
        seed=cfg.seed,
        device=device,
        dtype=autocast_dtype(cfg.precision, device),
        workers=loader_workers(cfg, device),
        mask_cell=cfg.mask_cell,
    )
    found = fit_views(fitter, cfg.view_agreement)
    fitted = {"strong_crop_min": found.crop_min, "rand_augment": found.rand_augment, "hflip": found.hflip}
    # A field the user set wins over the fitted one.
    chosen = {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in fitted.items()}
    return replace(cfg, **chosen), found


def _stored_views(checkpoint_dir: Path | None, cfg: MustConfig) -> MustConfig | None:
    """The view fields a checkpointed run chose, so a resumed run trains on the same views."""
    state = read_latest(checkpoint_dir) if checkpoint_dir is not None else None
    stored = (state or {}).get("meta", {}).get("config", {})
    if any(stored.get(name) is None for name in _VIEW_FIELDS):
        return None
    return replace(cfg, **{name: stored[name] for name in _VIEW_FIELDS})


def guard_outputs(
    network: MustNetwork | SnapshotMemory,
    preprocess: Any,
    paths: Sequence[Path],
    cfg: MustConfig,
    device: torch.device,
    logit_scale: float | None = None,
) -> Outputs:
    """Features and probabilities on the guard sample, as served (eval view, fp32 head)."""
    views = _Seedless(eval_transform(preprocess))
    scale = logit_scale if logit_scale is not None else float(network.logit_scale)
    # Loading draws a base seed from torch's RNG; the run's random streams must not move.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batches = (x for x in _batches(paths, views, cfg, device))
        dtype = autocast_dtype(cfg.precision, device)
        return outputs_of(network.visual, network.head, scale, batches, device, dtype)


@dataclass
class Adaptation:
    """One MUST run, set up from unlabeled images: the steps `adapt()` runs, for callers that
    put their own work between them (the worker restores a stored checkpoint before `start`).

    Keeping the setup in one place matters for resume: a resumed run must seed, calibrate and
    build its views exactly as the interrupted one did.
    """

    prepared: Prepared
    task: MustTask
    config: MustConfig
    paths: list[Path]
    device: torch.device
    guard: Guard
    guard_paths: list[Path]
    views: ViewFit | None = None
    decision: Decision | None = None
    # Every candidate's guard-sample outputs seen in this process, by candidate name.
    seen: dict[str, Outputs] = field(default_factory=dict)
    # How the run started when asked to start from the instant method's head (None: not asked).
    warm_start: dict[str, Any] | None = None
    # Few-label mode's labelled images (None: no labels).
    labelled: Labelled | None = None

    @property
    def num_classes(self) -> int:
        return self.prepared.network.num_classes

    @property
    def threshold(self) -> list[float]:
        return self.task.threshold.flatten().tolist()

    @property
    def snapshots(self) -> SnapshotMemory:
        return self.task.snapshots

    def guard_steps(self) -> dict[int, int]:
        """Step -> guard point index, for the points inside the schedule."""
        total = int(self.config.total_steps or 0)
        steps = {max(1, round(f * total)): i for i, f in enumerate(GUARD_POINTS)}
        return {step: i for step, i in steps.items() if step < total}

    def outputs(self, network: MustNetwork) -> Outputs:
        preprocess = self.prepared.clip.preprocess
        return guard_outputs(network, preprocess, self.guard_paths, self.config, self.device)

    def _score_snapshot(self, step: int, index: int) -> None:
        teacher = self.task.teacher.module
        name = f"teacher@{step}"
        self.seen[name] = self.outputs(teacher)  # type: ignore[arg-type]
        score = self.guard.score(name, self.seen[name], step)
        kept = self.snapshots.offer(index, score, teacher, self.config.guard_margin)  # type: ignore[arg-type]
        log.info("guard: teacher at step %d margin %+.4f%s", step, score.margin, " (kept)" if kept else "")

    def train(self, checkpoint_dir: Path, hooks: TrainerHooks | None = None) -> FitResult:
        """Run the schedule, resuming from `checkpoint_dir/latest.json` when there is one."""
        cfg = self.config
        hooks = hooks or TrainerHooks()
        points = self.guard_steps()
        user_on_step = hooks.on_step

        def on_step(metrics: StepMetrics) -> None:
            if metrics.step in points:
                self._score_snapshot(metrics.step, points[metrics.step])
            if user_on_step is not None:
                user_on_step(metrics)

        views = TwoViews(self.prepared.clip.preprocess, cfg.strong_crop_min, cfg.rand_augment, cfg.hflip)
        return fit(
            self.task,
            PathViews(self.paths, views),
            cfg,
            device=self.device,
            checkpoint_dir=checkpoint_dir,
            hooks=replace(hooks, on_step=on_step),
        )

    def choose(self) -> Decision:
        """Score the final teacher and student, add the snapshots' scores, and decide what to serve."""
        total = int(self.config.total_steps or 0)
        scores = [self.guard.zero_shot_score()]
        scores += self.snapshots.scores()
        self.seen["teacher"] = self.outputs(self.task.teacher.module)  # type: ignore[arg-type]
        self.seen["student"] = self.outputs(self.task.student)
        scores.append(self.guard.score("teacher", self.seen["teacher"], total))
        scores.append(self.guard.score("student", self.seen["student"], total))
        # A snapshot is only servable while its weights are held: the best one.
        kept = self.snapshots.kept_step
        servable = [s for s in scores if not s.name.startswith("teacher@") or s.step == kept]
        decision = decide(servable, self.config.guard_margin)
        decision.candidates = scores
        if decision.served not in self.seen:
            # A snapshot scored before the job was resumed: its outputs come from the weights held.
            scale = self.prepared.network.logit_scale
            self.seen[decision.served] = guard_outputs(
                self.snapshots,
                self.prepared.clip.preprocess,
                self.guard_paths,
                self.config,
                self.device,
                scale,
            )
        self.decision = decision
        return decision

    def predictions(self, decision: Decision) -> dict[str, Any]:
        """On the guard sample: how many images each class gets from zero-shot and from the served
        classifier (the class-prior bias adaptation corrects shows here), and quantiles of the
        served classifier's confidence (to choose an abstain threshold without labels)."""
        k = self.prepared.network.num_classes
        served = self.seen.get(decision.served, self.seen[ZERO_SHOT])
        counts = {
            name: torch.bincount(self.seen[name].labels, minlength=k).tolist()
            for name in dict.fromkeys([ZERO_SHOT, decision.served])
            if name in self.seen
        }
        confidence = served.probs.max(1).values
        levels = (0.01, 0.05, 0.1, 0.25, 0.5)
        quantiles = torch.quantile(confidence, torch.tensor(levels)).tolist()
        return {
            "images": len(self.guard_paths),
            "class_counts": counts,
            "confidence_quantiles": {str(q): round(v, 5) for q, v in zip(levels, quantiles, strict=True)},
        }

    def zero_shot_classifier(self) -> ImageClassifier:
        """The zero-shot classifier again (training changed the network's weights in place)."""
        p = self.prepared
        return prepare(p.spec, p.class_names, p.templates, self.device, p.descriptions).classifier()

    def evaluate(self, paths: Sequence[Path], labels: Sequence[int]) -> dict[str, Any]:
        """Score zero-shot, teacher, student and the served classifier on a labelled set.

        Only reported: the labels never train and never change what `choose` serves.
        """
        decision = self.decision or self.choose()
        p = self.prepared
        scores = {
            "zero_shot": score_classifier(self.zero_shot_classifier(), paths, labels),
            "teacher": score_classifier(p.classifier(self.task.teacher.module), paths, labels),  # type: ignore[arg-type]
            "student": score_classifier(p.classifier(self.task.student), paths, labels),
        }
        served = decision.served
        scores["served"] = (
            scores[served]
            if served in scores
            else score_classifier(self.served_classifier(decision), paths, labels)
        )
        return {
            "images": len(paths),
            "class_names": list(p.class_names),
            "served": served,
            "candidates": scores,
        }

    def served_classifier(self, decision: Decision) -> ImageClassifier:
        """The classifier `decision` names, with the run's class names and preprocessing."""
        p = self.prepared
        if decision.served == ZERO_SHOT:
            return self.zero_shot_classifier()
        if decision.served == "student":
            return p.classifier(self.task.student)
        if decision.served == "teacher":
            return p.classifier(self.task.teacher.module)  # type: ignore[arg-type]
        memory = self.snapshots
        visual = copy.deepcopy(memory.visual).eval()
        return ImageClassifier(visual, memory.head, p.network.logit_scale, p.class_names, p.clip.preprocess)

    def export(
        self,
        out_dir: Path,
        result: FitResult,
        skipped: SkipReport,
        source_model: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write the guard's choice as the served classifier, with the run's label-free report."""
        decision = self.decision or self.choose()
        metrics = {
            "images_used": len(self.paths),
            "images_skipped": skipped.to_dict(),
            "threshold": self.threshold,
            "views": self.views.to_dict() if self.views else None,
            "guard": decision.to_dict(),
            "predictions": self.predictions(decision),
            "class_descriptions": self.prepared.descriptions,
            "last_step": result.history[-1] if result.history else {},
            **({"warm_start": self.warm_start} if self.warm_start is not None else {}),
            **(
                {"labelled": self.labelled.summary(self.prepared.network.num_classes)}
                if self.labelled
                else {}
            ),
        }
        return export_classifier(
            self.served_classifier(decision),
            out_dir,
            model_cfg=self.prepared.clip.model_cfg,
            templates=self.prepared.templates,
            source_model=source_model or self.prepared.source_model(),
            metrics=metrics,
            network=decision.served,
        )


def start(
    paths: Sequence[Path],
    class_names: Sequence[str],
    *,
    model: ModelSpec,
    templates: Sequence[str] | None = None,
    config: MustConfig | None = None,
    device: torch.device | str | None = None,
    checkpoint_dir: Path | None = None,
    descriptions: Mapping[str, str] | None = None,
    initial_head: torch.Tensor | None = None,
    labelled: Labelled | None = None,
) -> Adaptation:
    """Resolve the defaults for these images, load the CLIP, fit the views, choose the threshold
    and score zero-shot for the guard, all without labels.

    With a `checkpoint_dir` that holds a checkpoint, the views it was trained with are kept.
    With an `initial_head` (the instant method's), teacher and student start from it instead of
    the text head; the views are still fitted, and the guard still compares with, zero-shot.
    With `labelled` images (few-label mode) the starting head, unless given, mixes their class
    prototypes into the text head, and every step adds a cross-entropy on a batch of them.
    """
    device = torch.device(device) if device is not None else default_device()
    cfg = resolve((config or MustConfig()).validate(), len(paths))
    torch.manual_seed(cfg.seed)
    prepared = prepare(model, class_names, templates, device, descriptions)
    # Calibration, view fitting and guard scoring are deterministic (seeded views, zero-shot
    # weights), so a resumed run recomputes what the interrupted one measured.
    fitted, views = fit_student_views(prepared, paths, cfg, device)
    # A resumed run keeps the views it trained with, even where a new measurement would differ.
    cfg = _stored_views(checkpoint_dir, cfg) or fitted
    guard_paths = sample_paths(paths, cfg.guard_images)
    # Before the head may change: the guard's reference is the classifier the user started with.
    # (guard_outputs forks the RNG, so this order leaves calibration's random streams as they were.)
    zero_shot = guard_outputs(prepared.network, prepared.clip.preprocess, guard_paths, cfg, device)
    if initial_head is None and labelled is not None:
        initial_head = _prototype_head(prepared, labelled, cfg, device)
    if initial_head is not None:
        _set_head(prepared.network, initial_head)
    threshold = calibrate(prepared, paths, cfg, device)
    task = MustTask(prepared.network, cfg, threshold.to(device))
    if labelled is not None:
        weak = weak_transform(prepared.clip.preprocess)
        task.labelled = LabelledBatches(labelled, weak, max(1, cfg.batch_size // 2), cfg.seed)
    run = Adaptation(prepared, task, cfg, list(paths), device, Guard(zero_shot), guard_paths, views)
    run.seen[ZERO_SHOT] = zero_shot
    run.labelled = labelled
    return run


def _prototype_head(
    prepared: Prepared, labelled: Labelled, cfg: MustConfig, device: torch.device
) -> torch.Tensor:
    """The text head mixed with the labelled images' class prototypes (zero-shot features)."""
    outputs = guard_outputs(prepared.network, prepared.clip.preprocess, labelled.paths, cfg, device)
    labels = torch.as_tensor(labelled.labels)
    return prototype_head(prepared.network.head.detach().float().cpu(), outputs.features, labels)


def _set_head(network: MustNetwork, head: torch.Tensor) -> None:
    if tuple(head.shape) != tuple(network.head.shape):
        raise ConfigError(f"initial head has shape {tuple(head.shape)}, expected {tuple(network.head.shape)}")
    with torch.no_grad():
        network.head.copy_(head.to(network.head.device, network.head.dtype))


@dataclass
class AdaptResult:
    classifier_dir: Path
    manifest: Manifest | None  # None on the ranks other than 0 of a distributed run: rank 0 exports
    fit: FitResult
    config: MustConfig
    num_images: int
    skipped: SkipReport
    threshold: list[float] = field(default_factory=list)
    decision: Decision | None = None


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
    descriptions: Mapping[str, str] | None = None,
) -> AdaptResult:
    """Run MUST end to end on local images and export the adapted classifier to `out_dir/classifier`."""
    paths, skipped = list_images(images, max_images)
    checkpoints = out_dir / "checkpoints"
    run = start(
        paths,
        class_names,
        model=model,
        templates=templates,
        config=config,
        device=device,
        checkpoint_dir=checkpoints,
        descriptions=descriptions,
    )
    result = run.train(checkpoints, hooks)
    manifest = run.export(out_dir / "classifier", result, skipped) if world().is_main else None
    return AdaptResult(
        out_dir / "classifier",
        manifest,
        result,
        run.config,
        len(paths),
        skipped,
        run.threshold,
        run.decision,
    )
