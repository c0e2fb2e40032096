"""Loss terms of MUST: self-training, fairness, masked image modelling and global-local alignment."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Floor for probabilities before a log: keeps the loss finite when a class gets no mass.
_EPS = 1e-8

_STAT_KEYS = (
    "confident_fraction",
    "mean_pred_entropy",
    "normalized_mean_pred_entropy",
    "agreement",
    "teacher_max_prob",
)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over entries where `mask` is set; an exact, graph-connected 0 if none are."""
    weights = mask.to(values.dtype)
    # clamp instead of a branch: avoids a host sync, and 0 / 1 keeps the empty case at exactly 0.
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def self_training_loss(
    student_logits: Tensor, teacher_probs: Tensor, threshold: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the student against the teacher's confident hard pseudo-labels."""
    teacher_probs = teacher_probs.detach()
    max_prob, pseudo_labels = teacher_probs.max(dim=1)
    if isinstance(threshold, Tensor) and threshold.ndim > 0:
        threshold = threshold.to(max_prob.device)[pseudo_labels]
    keep = max_prob > threshold
    per_sample = F.cross_entropy(student_logits, pseudo_labels, reduction="none")
    # where() keeps a non-finite loss on a dropped sample from leaking into the mean.
    per_sample = torch.where(keep, per_sample, torch.zeros_like(per_sample))
    return _masked_mean(per_sample, keep), keep


def fairness_loss(
    student_probs: Tensor, prev_mean: Tensor | None = None, momentum: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Negative mean log of the batch-mean prediction; rewards spreading predictions over all classes."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    # float32 so the eps floor is representable even when probs arrive in half precision.
    p_bar = student_probs.float().mean(dim=0)
    if prev_mean is not None:
        p_bar = momentum * prev_mean.detach().to(p_bar) + (1.0 - momentum) * p_bar
    loss = -p_bar.clamp_min(_EPS).log().mean()
    if prev_mean is not None:
        # Undo the (1 - momentum) shrink of this step's gradient so smoothing does not weaken the term.
        loss = loss / (1.0 - momentum)
    return loss, p_bar.detach()


def masked_image_loss(pred_pixels: Tensor, target_pixels: Tensor, pixel_mask: Tensor) -> Tensor:
    """Mean L1 error between predicted and target images over masked pixels only."""
    if pixel_mask.ndim == 3:
        pixel_mask = pixel_mask.unsqueeze(1)
    mask = pixel_mask.to(pred_pixels.dtype).expand_as(pred_pixels)
    return _masked_mean((pred_pixels - target_pixels).abs(), mask)


def alignment_loss(cls_feature: Tensor, patch_features: Tensor, token_mask: Tensor) -> Tensor:
    """Mean squared L2 distance between normalised masked patch features and their image's class feature."""
    cls_unit = F.normalize(cls_feature, dim=-1)
    patch_unit = F.normalize(patch_features, dim=-1)
    sq_dist = (patch_unit - cls_unit.unsqueeze(1)).pow(2).sum(dim=-1)
    return _masked_mean(sq_dist, token_mask)


def label_free_stats(teacher_probs: Tensor, student_probs: Tensor, keep_mask: Tensor) -> dict[str, float]:
    """Batch diagnostics that need no labels: confidence, prediction balance and teacher-student agreement."""
    with torch.no_grad():
        num_classes = student_probs.shape[1]
        mean_probs = student_probs.float().mean(dim=0)
        entropy = -(mean_probs * mean_probs.clamp_min(_EPS).log()).sum()
        # With one class there is nothing to balance; report 0 rather than dividing by log(1) = 0.
        max_entropy = math.log(num_classes) if num_classes > 1 else math.inf
        teacher_max, teacher_label = teacher_probs.max(dim=1)
        agreement = (teacher_label == student_probs.argmax(dim=1)).float().mean()
        # One stack + tolist() so a GPU batch costs a single device sync.
        values = torch.stack(
            [keep_mask.float().mean(), entropy, entropy / max_entropy, agreement, teacher_max.float().mean()]
        ).tolist()
    return dict(zip(_STAT_KEYS, values, strict=True))
