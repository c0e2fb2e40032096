"""Few-label mode on the suite's cases: 1, 4 and 16 labelled images per class.

    .venv/bin/python -m bench.suite --few-label [--cases ...] [--few-label-must]

Per case and number of labels, on the same held-out images as the suite: the instant method with
the labelled images (its served classifier, after the label-free guard), a linear probe trained
on the same labelled images alone (logistic regression on the frozen features, settings fixed
beforehand: zero start, Adam 1e-2, 300 steps, weight decay 1e-4), the instant method without
labels, and MUST without labels (the last recorded full run). `--few-label-must` also runs MUST
with the labelled images (the platform's defaults; as long as a MUST run, per case and count).

The labelled images are the first `n` per class of one seeded stream that neither the unlabeled
nor the held-out images use, so the 1-label set is inside the 4-label set, inside the 16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from services.must.adapt import list_images, start
from services.must.data import Labelled
from services.must.evaluation import top1
from services.must.export import load_classifier
from services.must.inference import ImageClassifier
from services.must.instant import FolderFeatureCache, start_instant

CASES = ("shapes-closeup", "glyphs-colour", "glyphs-34-blur")
SHOTS = (1, 4, 16)
LABELLED_SEED = 8101
PROBE_STEPS, PROBE_LR, PROBE_DECAY = 300, 1e-2, 1e-4


@dataclass
class FewLabelRow:
    """One case at one number of labels per class."""

    shots: int
    instant: float
    instant_served: float
    instant_served_name: str
    probe: float
    must: float | None = None
    must_served_name: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def labelled_images(case: Any, shots: int, out: Path) -> Labelled:
    """The first `shots` images per class of the labelled stream, written as PNG files."""
    out.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for i, (image, label) in enumerate(case.images(shots * len(case.class_names), LABELLED_SEED)):
        path = out / f"{case.name}-labelled-{i:05d}.png"
        image.save(path)
        paths.append(path)
        labels.append(label)
    counts = torch.bincount(torch.tensor(labels), minlength=len(case.class_names))
    assert bool((counts == shots).all()), "the case's sampler must cycle through its classes"
    return Labelled(paths, labels)


@torch.no_grad()
def _features(classifier: ImageClassifier, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            F.normalize(classifier.visual(pixels[i : i + 256]).float(), dim=-1)
            for i in range(0, len(pixels), 256)
        ]
    )


def linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: float
) -> torch.Tensor:
    """Logistic regression [D, K] on the labelled features alone (the few-shot baseline)."""
    head = torch.zeros(features.shape[1], num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([head], lr=PROBE_LR, weight_decay=PROBE_DECAY)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(scale * features @ head, labels).backward()
        optimizer.step()
    return head.detach()


def _instant(
    case: Any, paths: list[Path], work: Path, model: Any, labelled: Labelled | None
) -> tuple[Any, float]:
    began = time.perf_counter()
    run = start_instant(
        paths, case.class_names, model=model, labelled=labelled, cache=FolderFeatureCache(work / "features")
    )
    result = run.train()
    run.export(work / "instant", result, list_images(paths)[1])
    return run, time.perf_counter() - began


def _must(
    case: Any, paths: list[Path], work: Path, model: Any, labelled: Labelled, test: Any
) -> tuple[float, str, float]:
    began = time.perf_counter()
    run = start(paths, case.class_names, model=model, labelled=labelled)
    fit = run.train(work / "checkpoints")
    decision = run.choose()
    run.export(work / "must", fit, list_images(paths)[1])
    return top1(load_classifier(work / "must"), *test), decision.served, time.perf_counter() - began


def run_few_label(case: Any, work: Path, test_images: int, model: Any, must: bool) -> dict[str, Any]:
    """Every count of labels on one case; returns the case's row of the JSON line."""
    from bench.suite import _write  # the suite's own image writer (same seeds as its runs)

    _write(case, case.train_images, seed=7, out=work / "unlabeled")
    paths = list_images(work / "unlabeled")[0]
    images, labels = zip(*case.images(test_images, seed=9001), strict=True)
    base, base_seconds = _instant(case, paths, work / "none", model, None)
    zero_shot = base.zero_shot_classifier()
    test = zero_shot.preprocess(list(images)), torch.tensor(labels)
    test_features = _features(zero_shot, test[0])
    rows = []
    for shots in SHOTS:
        labelled = labelled_images(case, shots, work / f"labelled-{shots}")
        run, seconds = _instant(case, paths, work / f"shots-{shots}", model, labelled)
        served = load_classifier(work / f"shots-{shots}" / "instant")
        lab_pixels = zero_shot.preprocess([Image.open(p) for p in labelled.paths])
        probe = linear_probe(
            _features(zero_shot, lab_pixels),
            torch.tensor(labelled.labels),
            len(case.class_names),
            zero_shot.logit_scale,
        )
        row = FewLabelRow(
            shots,
            top1(run.instant_classifier(), *test),
            top1(served, *test),
            run.decision.served if run.decision else "?",
            100.0 * float(((test_features @ probe).argmax(1) == test[1]).float().mean()),
            seconds={"instant": round(seconds, 2)},
        )
        if must:
            row.must, row.must_served_name, must_seconds = _must(
                case, paths, work / f"must-{shots}", model, labelled, test
            )
            row.seconds["must"] = round(must_seconds, 1)
        rows.append(row)
    base_served = top1(load_classifier(work / "none" / "instant"), *test)
    return {
        "case": case.name,
        "classes": len(case.class_names),
        "zero_shot": round(top1(zero_shot, *test), 2),
        "instant_no_labels": round(base_served, 2),
        "instant_no_labels_seconds": round(base_seconds, 2),
        "rows": [_row_dict(r) for r in rows],
    }


def _row_dict(row: FewLabelRow) -> dict[str, Any]:
    out = {
        "shots": row.shots,
        "instant": round(row.instant, 2),
        "instant_served": round(row.instant_served, 2),
        "instant_served_classifier": row.instant_served_name,
        "linear_probe": round(row.probe, 2),
        "seconds": row.seconds,
    }
    if row.must is not None:
        out |= {"must": round(row.must, 2), "must_served_classifier": row.must_served_name}
    return out


def print_table(results: list[dict[str, Any]], recorded_must: dict[str, float]) -> None:
    """One line per case and number of labels, beside the label-free results."""
    head = f"{'case':<16} {'K':>4} {'labels':>6} {'zero-shot':>9} {'instant':>8} {'+labels':>8}"
    print(f"\n{head} {'probe':>6} {'MUST':>6} {'MUST+labels':>11}")
    for r in results:
        for row in r["rows"]:
            must_labels = f"{row['must']:>11.1f}" if "must" in row else f"{'-':>11}"
            print(
                f"{r['case']:<16} {r['classes']:>4} {row['shots']:>6} {r['zero_shot']:>9.1f} "
                f"{r['instant_no_labels']:>8.1f} {row['instant_served']:>8.1f} {row['linear_probe']:>6.1f} "
                f"{recorded_must.get(r['case'], float('nan')):>6.1f} {must_labels}"
            )
