from __future__ import annotations

import math

import pytest
import torch

from services.must.losses import (
    alignment_loss,
    ema_momentum,
    fairness_loss,
    fairness_window,
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
    loss, log_acc = fairness_loss(torch.full((5, 4), 0.25).log())
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)
    assert torch.allclose(log_acc.exp(), torch.full((4,), 0.25))


def test_fairness_skewed_hand_value() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    loss, log_acc = fairness_loss(probs.log())
    assert log_acc.exp().tolist() == pytest.approx([0.7, 0.3])
    assert loss.item() == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)


def test_fairness_running_estimate_hand_values() -> None:
    """Two batches with m = 0.5: A1 = 0.5 b1, A2 = 0.25 b1 + 0.5 b2, p_bar2 = A2 / 0.75."""
    b1 = torch.tensor([[0.9, 0.1], [0.5, 0.5]])  # mean [0.7, 0.3]
    b2 = torch.tensor([[0.2, 0.8], [0.4, 0.6]])  # mean [0.3, 0.7]
    loss1, log_a1 = fairness_loss(b1.log(), momentum=0.5)
    assert log_a1.exp().tolist() == pytest.approx([0.35, 0.15])
    assert loss1.item() == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)  # debiased

    loss2, log_a2 = fairness_loss(b2.log(), log_a1, steps=1, momentum=0.5)
    assert log_a2.exp().tolist() == pytest.approx([0.325, 0.425])
    p_bar = torch.tensor([0.325, 0.425]) / 0.75
    assert loss2.item() == pytest.approx(float(-p_bar.log().mean()), rel=1e-6)
    assert not log_a2.requires_grad
    # Each sample's gradient is -(1/K) / (B p_bar): the current batch's share (0.5 / 0.75) is undone.
    log_b2 = b2.log().requires_grad_(True)
    loss3, _ = fairness_loss(log_b2, log_a1, steps=1, momentum=0.5)
    loss3.backward()
    per_prob = (-(1 / 2) / (2 * p_bar)).expand(2, 2)
    assert log_b2.grad is not None
    assert torch.allclose(log_b2.grad, per_prob * b2, atol=1e-6)  # d/d log p = p * d/dp


def test_fairness_starved_class_keeps_an_exact_log_and_its_gradient() -> None:
    """A class whose probability underflows to 0 in fp32 still gets a finite loss and a push up."""
    logits = torch.tensor([[0.0, 0.0, -200.0], [0.0, 0.0, -200.0]], requires_grad=True)
    assert logits.softmax(-1)[0, 2].item() == 0.0  # a probability floor would see nothing here
    loss, log_acc = fairness_loss(logits.log_softmax(-1))
    assert torch.isfinite(loss)
    assert log_acc[2].item() == pytest.approx(-200.0 - math.log(2), abs=1e-3)
    loss.backward()
    assert logits.grad is not None
    # The starved class's logit gets the strongest push up: (1/K) per sample (exactly, p_k / p_bar_k).
    assert logits.grad[:, 2].tolist() == pytest.approx([-1 / 3 / 2, -1 / 3 / 2], rel=1e-4)


def test_ema_momentum_matches_the_window_in_variance() -> None:
    assert ema_momentum(64, 1024) == pytest.approx(15 / 17)
    assert ema_momentum(1024, 1024) == 0.0
    assert ema_momentum(4096, 1024) == 0.0
    m = ema_momentum(32, 1024)
    assert (1 + m) / (1 - m) * 32 == pytest.approx(1024)


def _confident_batch(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Log-probabilities of a correct, balanced, confident classifier: 0.9 on a uniform class."""
    labels = torch.randint(0, k, (n,), generator=gen)
    logits = torch.randn(n, k, generator=gen) * 0.5
    logits[torch.arange(n), labels] += math.log(0.9 * (k - 1) / 0.1)
    return logits.log_softmax(-1)


def _push(log_probs: torch.Tensor, **running: object) -> float:
    """Per-sample strength of the fairness gradient: mean over classes of |N dL/dp_ik|, N = batch."""
    probs = log_probs.exp().requires_grad_(True)
    loss, _ = fairness_loss(probs.log(), **running)  # type: ignore[arg-type]
    loss.backward()
    assert probs.grad is not None
    return float(probs.grad.abs().mean() * probs.shape[0])


def _reference_push(k: int, gen: torch.Generator, batches: int = 12) -> float:
    """The reference code's push: mean over a global batch of 1,024; from K = 512 on, smoothed
    half and half with its previous (detached) estimate and divided by 0.5."""
    prev, pushes = None, []
    for i in range(batches):
        probs = _confident_batch(1024, k, gen).exp().requires_grad_(True)
        p_bar = probs.mean(0)
        if k >= 512 and prev is not None:
            p_bar = 0.5 * prev + 0.5 * p_bar
            loss = -p_bar.log().mean() / 0.5
        else:
            loss = -p_bar.log().mean()
        loss.backward()
        prev = p_bar.detach()
        assert probs.grad is not None
        if i >= 4:
            pushes.append(float(probs.grad.abs().mean() * 1024))
    return sum(pushes) / len(pushes)


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_fairness_gradient_at_batch_64_matches_the_1024_sample_reference(k: int) -> None:
    """The running estimate at batch 64 pushes as hard as the reference's global batch of 1,024.

    A plain batch-of-64 mean (the old behaviour) over-pushes once K passes ~30: with 64 samples
    most classes get almost no mass, and 1 / p_bar explodes.
    """
    gen = torch.Generator().manual_seed(k)
    reference = _reference_push(k, gen)
    momentum = ema_momentum(64, fairness_window(k))
    log_acc, pushes = None, []
    for step in range(300):
        batch = _confident_batch(64, k, gen)
        if step >= 150:
            pushes.append(_push(batch, log_running=log_acc, steps=step, momentum=momentum))
        _, log_acc = fairness_loss(batch, log_acc, steps=step, momentum=momentum)
    running = sum(pushes) / len(pushes)
    naive = sum(_push(_confident_batch(64, k, gen)) for _ in range(16)) / 16
    assert running == pytest.approx(reference, rel=0.2)
    if k >= 100:
        assert naive > 3 * reference


def test_fairness_window_follows_the_class_count() -> None:
    assert fairness_window(10) == 1024
    assert fairness_window(341) == 1024
    assert fairness_window(1000) == 3000
    assert fairness_window(10, samples=4096) == 4096
    assert fairness_window(1000, samples=64) == 64  # an explicit window is taken as given


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
