"""Loss terms of MUST: self-training, fairness, masked image modelling and global-local alignment."""

from __future__ import annotations

import math
from collections.abc import Callable

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


# Maps this process's count of averaged entries to the count a mean divides by. In a distributed
# run it is the mean count per rank (see distributed.mean_over_ranks): each rank's sum divided by it,
# then averaged over the ranks by DDP, is the mean over the global batch, as in one process.
Denominator = Callable[[Tensor], Tensor]


def _masked_mean(values: Tensor, mask: Tensor, denominator: Denominator | None = None) -> Tensor:
    """Mean of `values` over entries where `mask` is set; an exact, graph-connected 0 if none are."""
    weights = mask.to(values.dtype)
    count = weights.sum() if denominator is None else denominator(weights.sum().detach())
    # clamp instead of a branch: avoids a host sync, and 0 / 1 keeps the empty case at exactly 0.
    return (values * weights).sum() / count.clamp_min(1.0)


def self_training_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    threshold: float | Tensor,
    denominator: Denominator | None = None,
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
    return _masked_mean(per_sample, keep, denominator), keep


def ema_momentum(batch_size: int, window: int) -> float:
    """EMA momentum whose estimate has the variance of a plain mean over `window` samples.

    An EMA with weight (1 - m) on each batch of B samples averages over (1 + m) / (1 - m) batches
    in the variance sense; m = (W - B) / (W + B) makes that W samples. Batches of W or more need
    no memory (m = 0).
    """
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be positive, got {batch_size}, {window}")
    return max(0.0, (window - batch_size) / (window + batch_size))


def fairness_window(num_classes: int, samples: int | None = None) -> int:
    """Samples the fairness term's mean prediction is estimated over: `samples` when given, else
    ~1,000 and at least 3 per class.

    The reference estimates it over its global batch of 1,024; from 512 classes on, where 1,024
    samples leave about one per class, it also mixes in its previous estimate half and half,
    an EMA over about three batches (3,072 samples). max(1024, 3K) matches both regimes.
    """
    return samples if samples is not None else max(1024, 3 * num_classes)


def batch_log_mean(log_probs: Tensor) -> Tensor:
    """log of the batch-mean probability per class, from log-probabilities, without underflow."""
    return torch.logsumexp(log_probs.float(), dim=0) - math.log(log_probs.shape[0])


def fairness_loss(
    log_probs: Tensor, log_running: Tensor | None = None, steps: int = 0, momentum: float = 0.0
) -> tuple[Tensor, Tensor]:
    """-(1/K) sum_k log p_bar_k, with p_bar a debiased running mean of the student's predictions.

    `log_probs` [B, K] are this batch's log-probabilities (gathered across ranks when training
    is distributed). The estimate is an EMA of batch means, p_bar_t = A_t / (1 - m^t) with
    A_t = m A_{t-1} + (1 - m) mean(p), kept in the log domain (`log_running` is log A_{t-1}
    after `steps` updates, detached), so a starved class keeps an exact, finite log and its
    full gradient: no probability floor. The loss is divided by the current batch's share of
    the estimate, (1 - m) / (1 - m^t), in its gradient only, so each sample's gradient is
    -(1/K) / (B p_bar): what a plain mean over many samples would give, whatever the batch size.
    That is the reference's per-sample push, measured over its global batch of 1,024. The
    returned value is -mean log p_bar itself. Returns (loss, new log A_t).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    fresh = math.log1p(-momentum) + batch_log_mean(log_probs)
    if log_running is None or steps == 0 or momentum == 0.0:
        steps, log_acc = 0, fresh
    else:
        log_acc = torch.logaddexp(math.log(momentum) + log_running.detach().to(fresh), fresh)
    debias = 1.0 - momentum ** (steps + 1)
    value = -(log_acc - math.log(debias)).mean()
    # The reported value is -mean log p_bar (log K when balanced); the gradient is scaled by 1 / share.
    scaled = value * (debias / (1.0 - momentum))
    return value.detach() + (scaled - scaled.detach()), log_acc.detach()


def masked_image_loss(
    pred_pixels: Tensor, target_pixels: Tensor, pixel_mask: Tensor, denominator: Denominator | None = None
) -> Tensor:
    """Mean L1 error between predicted and target images over masked pixels only."""
    if pixel_mask.ndim == 3:
        pixel_mask = pixel_mask.unsqueeze(1)
    mask = pixel_mask.to(pred_pixels.dtype).expand_as(pred_pixels)
    return _masked_mean((pred_pixels - target_pixels).abs(), mask, denominator)


def alignment_loss(
    cls_feature: Tensor, patch_features: Tensor, token_mask: Tensor, denominator: Denominator | None = None
) -> Tensor:
    """Mean squared L2 distance between normalised masked patch features and their image's class feature."""
    cls_unit = F.normalize(cls_feature, dim=-1)
    patch_unit = F.normalize(patch_features, dim=-1)
    sq_dist = (patch_unit - cls_unit.unsqueeze(1)).pow(2).sum(dim=-1)
    return _masked_mean(sq_dist, token_mask, denominator)


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
