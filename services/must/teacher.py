"""Exponential-moving-average teacher for MUST's self-training."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


def ema_decay(step: int, start: float, end: float, warmup_steps: int) -> float:
    """EMA decay ramped linearly from `start` at step 0 to `end` at step >= warmup_steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    progress = max(step, 0) / warmup_steps
    return start + (end - start) * progress


def _paired(teacher: dict[str, Tensor], student: dict[str, Tensor], kind: str) -> list[tuple[Tensor, Tensor]]:
    """Match teacher and student tensors by name, failing loudly if the architectures differ."""
    if teacher.keys() != student.keys():
        missing = sorted(teacher.keys() ^ student.keys())
        raise KeyError(f"teacher and student {kind} names differ: {missing[:5]}")
    return [(teacher[name], student[name]) for name in teacher]


# timm's ModelEmaV3 is not used: its warm-up is a power law, decay = 1 - (1 + step / gamma) ** -power,
# whereas MUST ramps the decay linearly from d0 to its final value over a set number of steps, and the
# checkpoint must hold the teacher module itself (not a wrapper) so it can be resumed and exported directly.
class EmaTeacher:
    """Frozen EMA copy of a student network, updated with a linearly warmed-up decay."""

    def __init__(self, student: nn.Module, start_decay: float, end_decay: float, warmup_steps: int) -> None:
        self.module: nn.Module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.start_decay = start_decay
        self.end_decay = end_decay
        self.warmup_steps = warmup_steps

    def update(self, student: nn.Module, step: int) -> float:
        """Move every teacher parameter and float buffer towards the student; returns the decay used."""
        decay = ema_decay(step, self.start_decay, self.end_decay, self.warmup_steps)
        params = _paired(dict(self.module.named_parameters()), dict(student.named_parameters()), "parameter")
        buffers = _paired(dict(self.module.named_buffers()), dict(student.named_buffers()), "buffer")
        float_pairs = params + [(t, s) for t, s in buffers if t.is_floating_point()]
        with torch.no_grad():
            # lerp_(s, 1 - d) computes d * teacher + (1 - d) * student in place; foreach rejects empty lists.
            if float_pairs:
                torch._foreach_lerp_(
                    [t for t, _ in float_pairs], [s.detach() for _, s in float_pairs], 1.0 - decay
                )
            for teacher_buf, student_buf in buffers:
                if not teacher_buf.is_floating_point():
                    teacher_buf.copy_(student_buf)
        return decay

    def state_dict(self) -> dict[str, Any]:
        """State dict of the teacher module."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict into the teacher module (strict)."""
        self.module.load_state_dict(state_dict)
