"""Scoring a classifier: top-1 with labels (to report only, never to train) and label-free signals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.must.data import decode_image
from services.must.inference import ImageClassifier

EVAL_BATCH = 64


def top1(classifier: ImageClassifier, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent on preprocessed images."""
    if len(labels) == 0:
        return float("nan")
    preds = classifier.predict(pixels).argmax(1)
    return 100.0 * float((preds == labels.cpu()).float().mean())


def label_free_report(probs: torch.Tensor) -> dict[str, float]:
    """Signals that need no labels: mean confidence and how evenly predictions spread over classes."""
    k = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=k).float()
    share = counts / counts.sum().clamp_min(1)
    entropy = float(-(share * share.clamp_min(1e-12).log()).sum())
    return {
        "mean_max_probability": float(probs.max(1).values.mean()),
        "prediction_entropy": entropy,
        "normalized_prediction_entropy": entropy / math.log(k) if k > 1 else 0.0,
        "classes_predicted": int((counts > 0).sum()),
    }


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts: row = true class, column = predicted class."""
    index = labels.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1 (percent), per-class recall (classes with images only) and the confusion matrix as lists."""
    per_class = confusion.sum(1)
    total = int(per_class.sum())
    correct = int(confusion.diagonal().sum())
    recall = {
        name: float(confusion[i, i]) / int(per_class[i])
        for i, name in enumerate(class_names)
        if per_class[i] > 0
    }
    return {
        "top1": 100.0 * correct / total if total else float("nan"),
        "per_class_recall": recall,
        "confusion": confusion.tolist(),
    }


@torch.no_grad()
def predict_paths(
    classifier: ImageClassifier, paths: Sequence[Path], batch_size: int = EVAL_BATCH
) -> torch.Tensor:
    """The predicted class index of each image file, as the classifier serves (its eval transform)."""
    preds = []
    for i in range(0, len(paths), batch_size):
        images = [decode_image(path.read_bytes()) for path in paths[i : i + batch_size]]
        preds.append(classifier.predict(images, batch_size=batch_size).argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def score_classifier(
    classifier: ImageClassifier, paths: Sequence[Path], labels: Sequence[int]
) -> dict[str, Any]:
    """Top-1, per-class recall and confusion matrix of `classifier` on labelled image files."""
    preds = predict_paths(classifier, paths)
    k = len(classifier.class_names)
    return scores(confusion_matrix(preds, torch.as_tensor(list(labels)), k), classifier.class_names)
