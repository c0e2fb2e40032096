"""One combined MUST step: weak view to the teacher, masked strong view to the student, weights applied."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from services.must.config import MustConfig, resolve
from services.must.losses import alignment_loss, masked_image_loss
from services.must.masking import random_cell_mask, token_mask_to_pixels
from services.must.network import MustNetwork
from services.must.task import MustTask

WEIGHTS = {"fairness_weight": 0.5, "mim_weight": 2.0, "align_weight": 0.3}


def _task(network: MustNetwork, threshold: float = 0.0, **overrides: object) -> MustTask:
    cfg = resolve(MustConfig(batch_size=8, total_steps=10, **{**WEIGHTS, **overrides}), 100)  # type: ignore[arg-type]
    return MustTask(network, cfg, torch.tensor(threshold))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weak = torch.randn(8, 3, 32, 32, generator=gen)
    strong = torch.randn(8, 3, 32, 32, generator=gen)
    mask = random_cell_mask(8, (4, 4), 1, 0.25, gen)
    return weak, strong, mask


def test_one_step_combines_every_term_with_its_weight(micro_network: MustNetwork) -> None:
    task = _task(micro_network).train()
    # A teacher whose label is the brightest channel: a different label for each view of a sample,
    # so the test sees which view the teacher gets.
    task.teacher.module.forward = lambda x: 10.0 * x.mean(dim=(2, 3))  # type: ignore[method-assign]
    weak, strong, mask = _batch(0)
    out = task.training_forward(weak, strong, mask)

    student = task.student
    with torch.no_grad():
        pseudo = task.teacher.module(weak).argmax(-1)  # teacher on the WEAK view
    cls_token, patches = student.encode(strong, mask)  # student on the MASKED STRONG view
    logits = student.classify(cls_token)
    expected_self = F.cross_entropy(logits, pseudo)
    expected_fair = -logits.softmax(-1).mean(0).log().mean()
    pixels = token_mask_to_pixels(mask, student.grid, student.patch)
    expected_mim = masked_image_loss(student.decode(patches), strong, pixels)
    expected_align = alignment_loss(student.project(cls_token), student.project(patches), mask)

    assert out["self_training"].item() == pytest.approx(expected_self.item(), rel=1e-5)
    assert out["fairness"].item() == pytest.approx(expected_fair.item(), rel=1e-5)
    assert out["mim"].item() == pytest.approx(expected_mim.item(), rel=1e-5)
    assert out["align"].item() == pytest.approx(expected_align.item(), rel=1e-5)
    total = expected_self + 0.5 * expected_fair + 2.0 * expected_mim + 0.3 * expected_align
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)

    # The other pairings give other values: the views and the mask really go where they should.
    with torch.no_grad():
        swapped = F.cross_entropy(logits, task.teacher.module(strong).argmax(-1))
        unmasked = F.cross_entropy(student.classify(student.encode(strong)[0]), pseudo)
    assert not math.isclose(swapped.item(), expected_self.item(), rel_tol=1e-3)
    assert not math.isclose(unmasked.item(), expected_self.item(), rel_tol=1e-3)


def test_the_threshold_drops_unconfident_pseudo_labels(micro_network: MustNetwork) -> None:
    task = _task(micro_network, threshold=0.999).train()
    out = task.training_forward(*_batch(1))
    assert out["self_training"].item() == 0.0
    assert out["confident_fraction"].item() == 0.0
    assert torch.isfinite(out["loss"])


def test_fairness_estimate_runs_over_steps_and_is_a_buffer(micro_network: MustNetwork) -> None:
    task = _task(micro_network).train()
    assert task.fairness_momentum == pytest.approx((1024 - 8) / (1024 + 8))
    before = task.log_p_bar.clone()
    task.training_forward(*_batch(2))
    task.training_forward(*_batch(3))
    assert int(task.fairness_steps) == 2
    assert not torch.equal(before, task.log_p_bar)
    state = task.state_dict()
    assert {"log_p_bar", "fairness_steps", "threshold"} <= set(state)
    assert any(k.startswith("snapshots.") for k in state)


def test_logits_stay_fp32_under_bf16_autocast(micro_network: MustNetwork) -> None:
    task = _task(micro_network).train()
    weak, strong, mask = _batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls_token, _ = task.student.encode(strong, mask)
        assert cls_token.dtype == torch.bfloat16  # the tower does run in bf16
        logits = task.student.classify(cls_token)
    assert logits.dtype == torch.float32
    exact = task.student.classify(cls_token.float())
    assert torch.equal(logits, exact)
    # What bf16 logits would have been: at a scale of 100 they move by far more than fp32 rounding.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = F.normalize(task.student.project(cls_token), dim=-1)
        coarse = task.student.logit_scale * feats @ task.student.head
    assert coarse.dtype == torch.bfloat16
    assert (coarse.float() - exact).abs().max() > 1e-2
