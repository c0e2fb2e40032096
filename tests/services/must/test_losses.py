from __future__ import annotations

import math

import pytest
import torch

from services.must.losses import (
    alignment_loss,
    fairness_loss,
    label_free_stats,
    masked_image_loss,
    self_training_loss,
)


def _log_softmax(logits: list[float], index: int) -> float:
    return logits[index] - math.log(sum(math.exp(v) for v in logits))


def test_self_training_keeps_only_confident_samples() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.1, 0.8, 0.1], [0.4, 0.35, 0.25]])
    loss, keep = self_training_loss(logits, teacher, threshold=0.5)
    assert keep.tolist() == [True, False]
    assert loss.item() == pytest.approx(-_log_softmax([1.0, 2.0, 0.5], 1), rel=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[1] == 0)


def test_self_training_threshold_is_strict() -> None:
    logits = torch.zeros(1, 2)
    _, keep = self_training_loss(logits, torch.tensor([[0.75, 0.25]]), threshold=0.75)
    assert keep.tolist() == [False]


def test_self_training_averages_over_kept_samples() -> None:
    rows = [[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]
    logits = torch.tensor(rows)
    teacher = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    loss, keep = self_training_loss(logits, teacher, threshold=0.7)
    expected = -(_log_softmax(rows[0], 0) + _log_softmax(rows[1], 1)) / 2
    assert keep.tolist() == [True, True, False]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_self_training_nothing_kept_is_zero_with_grad() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    teacher = torch.full((3, 4), 0.25)
    loss, keep = self_training_loss(logits, teacher, threshold=0.9)
    assert not keep.any()
    assert loss.item() == 0.0
    assert torch.isfinite(loss)
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_self_training_per_class_threshold() -> None:
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.3, 0.7], [0.7, 0.3]])
    # Same confidence 0.7, but class 0 demands more than class 1.
    loss, keep = self_training_loss(logits, teacher, threshold=torch.tensor([0.8, 0.6]))
    assert keep.tolist() == [True, False]
    assert loss.item() == pytest.approx(-_log_softmax([0.0, 1.0], 1), rel=1e-6)


def test_fairness_uniform_is_log_k() -> None:
    loss, p_bar = fairness_loss(torch.full((5, 4), 0.25))
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)
    assert torch.allclose(p_bar, torch.full((4,), 0.25))


def test_fairness_skewed_hand_value() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    loss, p_bar = fairness_loss(probs)
    assert p_bar.tolist() == pytest.approx([0.7, 0.3])
    assert loss.item() == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)


def test_fairness_smoothing_mixes_and_rescales() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]], requires_grad=True)
    prev = torch.tensor([0.3, 0.7])
    loss, p_bar = fairness_loss(probs, prev_mean=prev, momentum=0.5)
    assert p_bar.tolist() == pytest.approx([0.5, 0.5])
    assert not p_bar.requires_grad
    assert loss.item() == pytest.approx(math.log(2) / 0.5, rel=1e-6)
    loss.backward()
    assert probs.grad is not None


def test_fairness_empty_class_is_finite() -> None:
    loss, _ = fairness_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.isfinite(loss)


def test_masked_image_loss_counts_masked_pixels_only() -> None:
    target = torch.zeros(1, 3, 2, 2)
    pred = torch.zeros(1, 3, 2, 2)
    pred[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([[[True, False], [False, False]]])
    loss = masked_image_loss(pred, target, mask)
    assert loss.item() == pytest.approx((1 + 2 + 3) / 3)
    pred[0, :, 1, 1] = 100.0
    assert masked_image_loss(pred, target, mask.float().unsqueeze(1)).item() == pytest.approx(2.0)


def test_masked_image_loss_no_mask_is_zero_with_grad() -> None:
    pred = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = masked_image_loss(pred, torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(pred.grad == 0)


def test_alignment_zero_when_patches_match_class_up_to_scale() -> None:
    cls = torch.tensor([[1.0, 2.0, 2.0]])
    patches = torch.stack([cls[0] * 3, cls[0] * 0.5], dim=0).unsqueeze(0)
    loss = alignment_loss(cls, patches, torch.tensor([[True, True]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_hand_value_2d() -> None:
    cls = torch.tensor([[2.0, 0.0]], requires_grad=True)
    patches = torch.tensor([[[0.0, 5.0], [-1.0, 0.0], [1.0, 1.0]]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = alignment_loss(cls, patches, mask)
    # unit class (1, 0); (0, 1) -> distance^2 2; (-1, 0) -> 4; third token unmasked.
    assert loss.item() == pytest.approx(3.0, rel=1e-6)
    loss.backward()
    assert cls.grad is not None
    assert patches.grad is not None
    assert torch.all(patches.grad[0, 2] == 0)


def test_alignment_nothing_masked_is_zero_with_grad() -> None:
    patches = torch.randn(2, 3, 4, requires_grad=True)
    loss = alignment_loss(torch.randn(2, 4), patches, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()


def test_label_free_stats_hand_values() -> None:
    teacher = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    student = torch.tensor([[0.8, 0.2], [0.8, 0.2]], requires_grad=True)
    stats = label_free_stats(teacher, student, torch.tensor([True, False]))
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert stats["confident_fraction"] == pytest.approx(0.5)
    assert stats["mean_pred_entropy"] == pytest.approx(entropy, rel=1e-6)
    assert stats["normalized_mean_pred_entropy"] == pytest.approx(entropy / math.log(2), rel=1e-6)
    assert stats["agreement"] == pytest.approx(0.5)
    assert stats["teacher_max_prob"] == pytest.approx(0.75)
    assert all(isinstance(v, float) for v in stats.values())


def test_label_free_stats_balanced_is_one() -> None:
    probs = torch.eye(3)
    stats = label_free_stats(probs, probs, torch.ones(3, dtype=torch.bool))
    assert stats["normalized_mean_pred_entropy"] == pytest.approx(1.0, rel=1e-6)
    assert stats["agreement"] == 1.0
