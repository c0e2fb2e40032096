from __future__ import annotations

import pytest
import torch
from torch import nn

from services.must.teacher import EmaTeacher, ema_decay


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("running", torch.tensor([10.0]))
        self.register_buffer("count", torch.tensor([3]))


def test_ema_decay_ramp() -> None:
    assert ema_decay(0, 0.9, 0.99, 100) == pytest.approx(0.9)
    assert ema_decay(50, 0.9, 0.99, 100) == pytest.approx(0.945)
    assert ema_decay(100, 0.9, 0.99, 100) == pytest.approx(0.99)
    assert ema_decay(1000, 0.9, 0.99, 100) == pytest.approx(0.99)
    assert ema_decay(0, 0.9, 0.99, 0) == pytest.approx(0.99)


def test_teacher_is_frozen_copy() -> None:
    student = _Tiny().train()
    teacher = EmaTeacher(student, 0.5, 0.9, 10)
    assert teacher.module is not student
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert student.weight.requires_grad


def test_update_lerps_params_and_buffers() -> None:
    student = _Tiny()
    teacher = EmaTeacher(student, 0.5, 0.9, 10)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([3.0, 6.0]))
        student.running.fill_(20.0)
        student.count.fill_(7)
    decay = teacher.update(student, step=0)
    assert decay == pytest.approx(0.5)
    # 0.5 * teacher + 0.5 * student
    assert teacher.module.weight.tolist() == pytest.approx([2.0, 4.0])
    assert teacher.module.running.tolist() == pytest.approx([15.0])
    assert teacher.module.count.tolist() == [7]
    assert not teacher.module.weight.requires_grad

    decay = teacher.update(student, step=10)
    assert decay == pytest.approx(0.9)
    assert teacher.module.weight.tolist() == pytest.approx([0.9 * 2 + 0.1 * 3, 0.9 * 4 + 0.1 * 6])


def test_state_dict_round_trip() -> None:
    student = _Tiny()
    teacher = EmaTeacher(student, 0.5, 0.9, 10)
    state = {k: v.clone() + 1 for k, v in teacher.state_dict().items()}
    fresh = EmaTeacher(_Tiny(), 0.5, 0.9, 10)
    fresh.load_state_dict(state)
    assert fresh.module.weight.tolist() == [2.0, 3.0]
    assert fresh.module.count.tolist() == [4]


def test_update_rejects_mismatched_student() -> None:
    teacher = EmaTeacher(_Tiny(), 0.5, 0.9, 10)
    with pytest.raises(KeyError):
        teacher.update(nn.Linear(2, 2), step=0)
