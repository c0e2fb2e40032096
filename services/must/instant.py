"""The instant method: adapt the class head to unlabeled images in seconds, without training
the image tower (`transductive` has the arithmetic).

    run = start_instant(paths, class_names, model=spec, cache=FolderFeatureCache(folder))
    result = run.train()        # encode (or read the cached features), fit, distil the head
    run.export(out_dir, result, skipped)

It offers the steps and attributes of a MUST `Adaptation` that the worker and the bench use
(`train`, `choose`, `export`, `evaluate`, `decision`, `seen`, `guard_paths`), so a job runs
either method through the same pipeline, guard, evaluation and serving. The served classifier
is the unchanged image tower with a new head, in the same artifact format as MUST's, and it
classifies unseen images like any other. The guard compares it with zero-shot on the same
sample of images as MUST's guard; when it does not beat zero-shot, the job serves zero-shot.

The image features (serving's view, one pass over the images) are the only costly part. They
are cached under the digest of the image tower and preprocessing and the digest of the images'
bytes, so a rerun, a resumed job or a MUST job warm-started from the same images reads them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load, save

from services.must.adapt import Prepared, _batches, _Seedless, default_device, prepare
from services.must.config import MustConfig
from services.must.data import Labelled, SkipReport
from services.must.errors import Cancelled, CheckpointError
from services.must.evaluation import score_classifier
from services.must.export import Manifest, export_classifier
from services.must.guard import ZERO_SHOT, Decision, Guard, Outputs, decide
from services.must.inference import ImageClassifier
from services.must.loading import ModelSpec
from services.must.trainer import FitResult, StepMetrics, TrainerHooks, autocast_dtype, describe
from services.must.transductive import InstantConfig, distill_head, prototype_head, transduce
from services.must.transforms import eval_transform
from services.must.views import autocast_or_not, sample_paths

log = logging.getLogger(__name__)

INSTANT = "instant"
FEATURES_FORMAT = "must-features/1"
# Progress is reported every this many distillation steps (each is one full-batch step).
_DISTILL_REPORT_EVERY = 20


class FeatureCache(Protocol):
    """Where image features are kept between runs: bytes by key (a folder, an object store)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


class FolderFeatureCache:
    """A FeatureCache in a local folder (the CLI and the bench)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str) -> bytes | None:
        path = self.folder / key
        return path.read_bytes() if path.is_file() else None

    def put(self, key: str, data: bytes) -> None:
        path = self.folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        tmp.replace(path)


def tower_digest(visual: torch.nn.Module, preprocess: Any) -> str:
    """sha256 of the image tower's tensors and the preprocessing: what the features depend on."""
    digest = hashlib.sha256(repr(preprocess).encode())
    for name, tensor in sorted(visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_digest(paths: Sequence[Path]) -> str:
    """sha256 over the images' bytes, in order (the features' rows follow that order)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def features_cache_key(model_hash: str, data_hash: str) -> str:
    return f"{model_hash}/{data_hash}.safetensors"


def features_to_bytes(features: torch.Tensor) -> bytes:
    return save({"features": features.half().contiguous()}, metadata={"format": FEATURES_FORMAT})


def features_from_bytes(data: bytes, rows: int) -> torch.Tensor:
    """The cached features [rows, D]; a CheckpointError when the blob is not what was stored."""
    try:
        features = load(data)["features"]
    except Exception as exc:  # safetensors raises its own error types for a damaged blob
        raise CheckpointError(f"cached image features are unreadable: {exc}") from exc
    if features.ndim != 2 or features.shape[0] != rows:
        raise CheckpointError(
            f"cached image features have shape {tuple(features.shape)}, expected {rows} rows"
        )
    return features.float()


@dataclass
class _Progress:
    """Turns the run's three phases into one step count for the trainer's progress callback."""

    hooks: TrainerHooks
    total: int
    began: float = field(default_factory=time.perf_counter)
    step: int = 0
    images: int = 0
    last: StepMetrics | None = None

    def advance(self, steps: int = 1, images: int = 0, losses: dict[str, float] | None = None) -> None:
        if self.hooks.should_cancel is not None and self.hooks.should_cancel():
            raise Cancelled("the instant adaptation was cancelled")
        self.step += steps
        self.images += images
        elapsed = time.perf_counter() - self.began
        metrics = StepMetrics(
            self.step, self.total, self.images / max(elapsed, 1e-9), 0.0, 0.0, losses or {}, {}, elapsed
        )
        self.last = metrics
        if self.hooks.on_step is not None:
            self.hooks.on_step(metrics)


@dataclass
class InstantRun:
    """One instant adaptation, set up from unlabeled images (see the module docstring)."""

    prepared: Prepared
    config: MustConfig
    instant: InstantConfig
    paths: list[Path]
    device: torch.device
    cache: FeatureCache | None = None
    guard_paths: list[Path] = field(default_factory=list)
    features: torch.Tensor | None = None
    head: torch.Tensor | None = None
    guard: Guard | None = None
    decision: Decision | None = None
    seen: dict[str, Outputs] = field(default_factory=dict)
    cache_hit: bool = False
    views: None = None
    threshold: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # Few-label mode: the labelled images and their class indices (see `transductive.transduce`).
    labelled: Labelled | None = None

    def _encode(self, paths: Sequence[Path], progress: _Progress) -> torch.Tensor:
        """Unit image features [N, D] of every image, as served (eval view, rounded to fp16)."""
        views = _Seedless(eval_transform(self.prepared.clip.preprocess))
        dtype = autocast_dtype(self.config.precision, self.device)
        visual = self.prepared.network.visual.eval()
        rows = []
        with torch.no_grad():
            for x in _batches(paths, views, self.config, self.device):
                with autocast_or_not(self.device, dtype):
                    f = visual(x.to(self.device))
                rows.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
                progress.advance(images=len(x))
        # Rounded as the cache stores them, so a cached rerun computes exactly what this one does.
        return torch.cat(rows).half().float()

    def _features(self, paths: Sequence[Path], progress: _Progress) -> torch.Tensor:
        """The cached features when the cache has this tower's features of these images, else encoded."""
        key = None
        if self.cache is not None:
            tower = tower_digest(self.prepared.network.visual, self.prepared.clip.preprocess)
            key = features_cache_key(tower, images_digest(paths))
            data = self.cache.get(key)
            if data is not None:
                self.cache_hit = paths is self.paths or self.cache_hit
                progress.advance(steps=_encode_steps(len(paths)), images=len(paths))
                return features_from_bytes(data, len(paths))
        features = self._encode(paths, progress)
        if self.cache is not None and key is not None:
            self.cache.put(key, features_to_bytes(features))
        return features

    def _text_head(self) -> torch.Tensor:
        return self.prepared.network.head.detach().float()

    def _anchored(self, progress: _Progress) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """All features, the head the fit starts from, and each row's known class (-1: unlabelled).

        Without labels: the unlabelled features and the text head. In few-label mode the labelled
        images join the features with their classes, and the head mixes in their class prototypes.
        """
        assert self.features is not None
        text_head = self._text_head()
        if self.labelled is None:
            return self.features.to(self.device), text_head, None
        z_lab = self._features(self.labelled.paths, progress).to(self.device)
        labels = torch.as_tensor(self.labelled.labels, device=self.device)
        known = torch.cat([torch.full((len(self.features),), -1, device=self.device), labels])
        head = prototype_head(text_head, z_lab, labels)
        return torch.cat([self.features.to(self.device), z_lab]), head, known

    def train(self, checkpoint_dir: Path | None = None, hooks: TrainerHooks | None = None) -> FitResult:
        """Encode (or read) the features, fit the labels and distil the head; `checkpoint_dir` is
        unused (the feature cache is what a rerun resumes from)."""
        cfg = self.instant
        labelled = len(self.labelled.paths) if self.labelled is not None else 0
        encode = _encode_steps(len(self.paths)) + (_encode_steps(labelled) if labelled else 0)
        progress = _Progress(hooks or TrainerHooks(), encode + cfg.iterations + cfg.distill_steps)
        began = time.perf_counter()
        self.features = self._features(self.paths, progress)
        # The fit runs where the model does: on a GPU, N x N similarities in chunks stay fast.
        z, start_head, known = self._anchored(progress)
        self.timings["features_s"] = round(time.perf_counter() - began, 3)
        scale = self.prepared.network.logit_scale
        zero_shot = (scale * z @ start_head).softmax(1)
        q = transduce(z, zero_shot, cfg, on_iteration=lambda _: progress.advance(), known=known)
        done = 0

        def on_distill(step: int, loss: float) -> None:
            nonlocal done
            if step % _DISTILL_REPORT_EVERY == 0 or step == cfg.distill_steps:
                progress.advance(steps=step - done, losses={"distill": loss})
                done = step

        self.head = distill_head(z, q, start_head, scale, cfg, on_step=on_distill).cpu()
        self.timings["fit_s"] = round(time.perf_counter() - began - self.timings["features_s"], 3)
        history = [describe(progress.last)] if progress.last is not None else []
        return FitResult(0, progress.step, time.perf_counter() - began, progress.last, history)

    def _outputs(self, head: torch.Tensor) -> Outputs:
        """Features and probabilities on the guard sample, from the cached features."""
        assert self.features is not None, "train() first"
        wanted = set(self.guard_paths)
        index = [i for i, p in enumerate(self.paths) if p in wanted]
        z = self.features[index]
        return Outputs(z, (self.prepared.network.logit_scale * z @ head).softmax(1))

    def choose(self) -> Decision:
        """The guard's choice between zero-shot and the instant head (MUST's guard and criterion)."""
        if self.head is None:
            raise RuntimeError("train() before choose()")
        self.seen[ZERO_SHOT] = self._outputs(self._text_head().cpu())
        self.seen[INSTANT] = self._outputs(self.head)
        self.guard = Guard(self.seen[ZERO_SHOT])
        scores = [self.guard.zero_shot_score(), self.guard.score(INSTANT, self.seen[INSTANT], 0)]
        self.decision = decide(scores, self.config.guard_margin)
        return self.decision

    def zero_shot_classifier(self) -> ImageClassifier:
        return self.prepared.classifier()

    def instant_classifier(self) -> ImageClassifier:
        if self.head is None:
            raise RuntimeError("train() before instant_classifier()")
        p = self.prepared
        return ImageClassifier(
            p.clip.visual, self.head, p.network.logit_scale, p.class_names, p.clip.preprocess
        )

    def served_classifier(self, decision: Decision) -> ImageClassifier:
        return self.instant_classifier() if decision.served == INSTANT else self.zero_shot_classifier()

    def predictions(self, decision: Decision) -> dict[str, Any]:
        """Class counts of zero-shot and the served head on the guard sample, and confidence quantiles."""
        k = self.prepared.network.num_classes
        served = self.seen[decision.served]
        counts = {
            name: torch.bincount(self.seen[name].labels, minlength=k).tolist()
            for name in dict.fromkeys([ZERO_SHOT, decision.served])
        }
        levels = (0.01, 0.05, 0.1, 0.25, 0.5)
        quantiles = torch.quantile(served.probs.max(1).values, torch.tensor(levels)).tolist()
        return {
            "images": len(self.guard_paths),
            "class_counts": counts,
            "confidence_quantiles": {str(q): round(v, 5) for q, v in zip(levels, quantiles, strict=True)},
        }

    def export(
        self,
        out_dir: Path,
        result: FitResult,
        skipped: SkipReport,
        source_model: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write the guard's choice (instant head or zero-shot) with the run's label-free report."""
        decision = self.decision or self.choose()
        metrics = {
            "method": INSTANT,
            "images_used": len(self.paths),
            "images_skipped": skipped.to_dict(),
            "instant": {**self.instant.to_dict(), "features_cached": self.cache_hit, **self.timings},
            **({"labelled": self.labelled.summary(len(self.prepared.class_names))} if self.labelled else {}),
            "guard": decision.to_dict(),
            "predictions": self.predictions(decision),
            "class_descriptions": self.prepared.descriptions,
            "last_step": result.history[-1] if result.history else {},
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

    def evaluate(self, paths: Sequence[Path], labels: Sequence[int]) -> dict[str, Any]:
        """Score zero-shot, the instant head and the served one on a labelled set (report only)."""
        decision = self.decision or self.choose()
        scores = {
            ZERO_SHOT: score_classifier(self.zero_shot_classifier(), paths, labels),
            INSTANT: score_classifier(self.instant_classifier(), paths, labels),
        }
        scores["served"] = scores[decision.served]
        return {
            "images": len(paths),
            "class_names": list(self.prepared.class_names),
            "served": decision.served,
            "candidates": scores,
        }


def _encode_steps(images: int) -> int:
    """Batches of the feature pass (seeded_batches' batch size)."""
    return -(-images // 128)


def start_instant(
    paths: Sequence[Path],
    class_names: Sequence[str],
    *,
    model: ModelSpec,
    templates: Sequence[str] | None = None,
    config: MustConfig | None = None,
    instant: InstantConfig | None = None,
    device: torch.device | str | None = None,
    descriptions: dict[str, str] | None = None,
    cache: FeatureCache | None = None,
    labelled: Labelled | None = None,
) -> InstantRun:
    """Load the CLIP and build the zero-shot head; `train()` does the rest (with `labelled`
    images and classes in few-label mode)."""
    device = torch.device(device) if device is not None else default_device()
    cfg = (config or MustConfig()).validate()
    prepared = prepare(model, class_names, templates, device, descriptions)
    guard_paths = sample_paths(paths, cfg.guard_images)
    run = InstantRun(
        prepared, cfg, (instant or InstantConfig()).validate(), list(paths), device, cache, guard_paths
    )
    run.labelled = labelled
    return run
