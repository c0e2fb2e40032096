"""MustTask: student, EMA teacher and the four MUST losses in one module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from services.must.config import MustConfig
from services.must.data import LabelledBatches
from services.must.distributed import gather, gather_with_grad, mean_over_ranks, world
from services.must.guard import SnapshotMemory
from services.must.losses import (
    alignment_loss,
    ema_momentum,
    fairness_loss,
    fairness_window,
    label_free_stats,
    masked_image_loss,
    self_training_loss,
)
from services.must.masking import token_mask_to_pixels
from services.must.network import MustNetwork
from services.must.teacher import EmaTeacher

# Few-label mode: the weight of the cross-entropy on the labelled images beside MUST's losses.
SUPERVISED_WEIGHT = 1.0


class StudentPass(nn.Module):
    """Everything the losses need from the student, computed in one forward().

    DDP synchronises the gradients of what its module's forward() computed, so the student's
    encode, classify, decode and project calls of one step go through this single forward.
    """

    def __init__(self, student: MustNetwork, *, mim: bool, align: bool) -> None:
        super().__init__()
        self.student = student
        self.mim, self.align = mim, align

    def forward(
        self, strong: torch.Tensor, token_mask: torch.Tensor, labelled: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        cls_token, patch_tokens = self.student.encode(strong, token_mask)
        out = {"logits": self.student.classify(cls_token)}
        if labelled is not None:  # few-label mode: the labelled images, whole (no mask)
            out["labelled_logits"] = self.student(labelled)
        if self.mim:
            out["pixels"] = self.student.decode(patch_tokens).float()
        if self.align:
            out["cls_proj"] = self.student.project(cls_token).float()
            out["patch_proj"] = self.student.project(patch_tokens).float()
        return out


class MustTask(nn.Module):
    """`training_forward` returns a dict of named losses with the weighted total under "loss".

    The teacher is an EMA copy held outside the module tree (it is not trained and has its own
    entry in checkpoints). `threshold` (scalar or per class) and the fairness term's running
    class-balance estimate (`log_p_bar`, `fairness_steps`) are buffers, so they travel with the
    task's state dict and resume exactly.
    """

    def __init__(self, student: MustNetwork, config: MustConfig, threshold: torch.Tensor) -> None:
        super().__init__()
        if config.ema_start is None or config.ema_end is None or config.ema_warmup_steps is None:
            raise ValueError("MustTask needs a resolved config (see config.resolve)")
        self.student = student
        self.config = config
        self.teacher = EmaTeacher(student, config.ema_start, config.ema_end, config.ema_warmup_steps)
        k = student.num_classes
        self.register_buffer("threshold", threshold.detach().clone().float())
        self.register_buffer("log_p_bar", torch.full((k,), -math.log(k)))
        self.register_buffer("fairness_steps", torch.zeros((), dtype=torch.long))
        self.fairness_momentum = ema_momentum(config.batch_size, fairness_window(k, config.fairness_samples))
        # The guard's best teacher snapshot so far (starts as the zero-shot network), see guard.py.
        self.snapshots = SnapshotMemory(student)
        # Few-label mode: a seeded batch of labelled images per step (None: no labels).
        self.labelled: LabelledBatches | None = None

    def train(self, mode: bool = True) -> MustTask:
        super().train(mode)
        self.teacher.module.eval()
        return self

    def student_pass(self) -> StudentPass:
        """The student's forward for one step, as the module a distributed run wraps in DDP."""
        cfg = self.config
        return StudentPass(self.student, mim=cfg.mim_weight > 0, align=cfg.align_weight > 0)

    def training_forward(
        self,
        weak: torch.Tensor,
        strong: torch.Tensor,
        token_mask: torch.Tensor,
        student: nn.Module | None = None,
        labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses for one batch: teacher on the weak view, student on the masked strong view, and
        in few-label mode a cross-entropy of the student on a batch of labelled images.

        `student` is `student_pass()` or that module wrapped in DDP (the default: unwrapped). In a
        distributed run the batch is this rank's share: the fairness term's mean prediction and the
        statistics use every rank's predictions (gathered), and the masked means divide by the
        mean count per rank, so that DDP's average of the ranks' gradients is the global batch's.
        Every rank draws the same labelled batch, so their mean cross-entropy is one process's.
        """
        cfg = self.config
        # classify() computes logits in fp32 even under autocast: pseudo-labels and the threshold
        # compare probabilities that bf16 logits (scale 100) would shift by several percent.
        with torch.no_grad():
            teacher_probs = self.teacher.module(weak).softmax(-1)
        labelled_images = labelled[0] if labelled is not None else None
        out = (student or self.student_pass())(strong, token_mask, labelled_images)
        logits = out["logits"]
        log_probs = logits.log_softmax(-1)
        denominator = mean_over_ranks if world().active else None

        l_self, keep = self_training_loss(logits, teacher_probs, self.threshold, denominator)
        all_log_probs = gather_with_grad(log_probs)
        l_fair, log_p_bar = fairness_loss(
            all_log_probs, self.log_p_bar, int(self.fairness_steps), self.fairness_momentum
        )
        self.log_p_bar.copy_(log_p_bar)
        self.fairness_steps += 1
        zero = logits.sum() * 0.0
        l_mim = l_align = zero
        if cfg.mim_weight > 0:
            pixel_mask = token_mask_to_pixels(token_mask, self.student.grid, self.student.patch)
            l_mim = masked_image_loss(out["pixels"], strong.float(), pixel_mask, denominator)
        if cfg.align_weight > 0:
            l_align = alignment_loss(out["cls_proj"], out["patch_proj"], token_mask, denominator)
        loss = l_self + cfg.fairness_weight * l_fair + cfg.mim_weight * l_mim + cfg.align_weight * l_align
        losses = {"loss": loss, "self_training": l_self, "fairness": l_fair, "mim": l_mim, "align": l_align}
        if labelled is not None:
            losses["supervised"] = F.cross_entropy(out["labelled_logits"], labelled[1])
            losses["loss"] = loss + SUPERVISED_WEIGHT * losses["supervised"]
        stats = label_free_stats(
            gather(teacher_probs), all_log_probs.detach().exp(), gather(keep.float()) > 0
        )
        return {**losses, **{k: torch.tensor(v) for k, v in stats.items()}}

    def update_teacher(self, step: int) -> float:
        """EMA step after an optimizer step; returns the decay used."""
        return self.teacher.update(self.student, step)
