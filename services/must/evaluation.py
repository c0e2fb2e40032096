"""Scoring a classifier: top-1 with labels (to report only, never to train) and label-free signals."""

from __future__ import annotations

import math

import torch

from services.must.inference import ImageClassifier


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
