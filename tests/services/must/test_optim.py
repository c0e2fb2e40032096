from __future__ import annotations

import io
import math

import pytest
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from services.must.optim import build_optimizer, cosine_schedule, layer_id_for, param_groups_layer_decay

LR = 1e-3
DECAY = 0.5
NUM_LAYERS = 2


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = VisionTransformer(
            image_size=32, patch_size=8, width=32, layers=NUM_LAYERS, heads=2, mlp_ratio=2.0, output_dim=16
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 32))
        self.decoder = nn.Linear(32, 8 * 8 * 3)


@pytest.fixture(scope="module")
def model() -> _Wrapper:
    return _Wrapper()


@pytest.fixture(scope="module")
def groups(model: _Wrapper) -> list[dict]:
    return param_groups_layer_decay(
        model,
        lr=LR,
        weight_decay=0.05,
        layer_decay=DECAY,
        num_layers=NUM_LAYERS,
        no_weight_decay={"decoder.bias"},
    )


def _group_of(groups: list[dict], param: nn.Parameter) -> dict:
    matches = [g for g in groups if any(p is param for p in g["params"])]
    assert len(matches) == 1
    return matches[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("conv1.weight", 0),
        ("visual.class_embedding", 0),
        ("visual.positional_embedding", 0),
        ("visual.ln_pre.bias", 0),
        ("mask_token", NUM_LAYERS + 1),
        ("visual.transformer.resblocks.0.attn.in_proj_weight", 1),
        ("transformer.resblocks.1.mlp.c_fc.bias", 2),
        ("visual.ln_post.weight", 3),
        ("visual.proj", 3),
        ("decoder.weight", 3),
        ("head.weight", 3),
    ],
)
def test_layer_id_for(name: str, expected: int) -> None:
    assert layer_id_for(name, NUM_LAYERS) == expected


def test_layer_scales(model: _Wrapper, groups: list[dict]) -> None:
    conv = _group_of(groups, model.visual.conv1.weight)
    assert conv["layer_id"] == 0
    assert conv["lr"] == pytest.approx(LR * DECAY**3)
    assert conv["weight_decay"] == 0.05
    block = _group_of(groups, model.visual.transformer.resblocks[1].mlp.c_fc.weight)
    assert block["layer_id"] == 2
    assert block["lr"] == pytest.approx(LR * DECAY)
    proj = _group_of(groups, model.visual.proj)
    assert proj["lr"] == pytest.approx(LR)
    assert proj["lr_scale"] == 1.0
    assert proj["name"] == "layer_3_decay"


def test_no_weight_decay_params(model: _Wrapper, groups: list[dict]) -> None:
    for name, param in model.named_parameters():
        group = _group_of(groups, param)
        if param.ndim <= 1:
            assert group["weight_decay"] == 0.0, name
    for param in (model.visual.positional_embedding, model.mask_token, model.decoder.bias):
        assert _group_of(groups, param)["weight_decay"] == 0.0
    # MUST's new modules train at the full rate, the mask token included (not the embeddings' 0.65^3).
    mask_group = _group_of(groups, model.mask_token)
    assert mask_group["layer_id"] == NUM_LAYERS + 1
    assert mask_group["lr"] == pytest.approx(LR)


def test_every_trainable_param_in_exactly_one_group(model: _Wrapper, groups: list[dict]) -> None:
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert all(g["params"] for g in groups)
    keys = [(g["layer_id"], g["weight_decay"] != 0.0) for g in groups]
    assert keys == sorted(keys)


def test_frozen_params_are_skipped() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].requires_grad_(False)
    groups = param_groups_layer_decay(net, lr=1.0, weight_decay=0.1, layer_decay=0.9, num_layers=1)
    assert sum(len(g["params"]) for g in groups) == 2


def test_build_optimizer_keeps_group_lrs(model: _Wrapper) -> None:
    opt = build_optimizer(
        model, lr=LR, weight_decay=0.05, layer_decay=DECAY, num_layers=NUM_LAYERS, betas=(0.9, 0.98)
    )
    assert isinstance(opt, torch.optim.AdamW)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx(sorted(LR * DECAY**k for k in range(4)))
    assert all(g["betas"] == (0.9, 0.98) for g in opt.param_groups)


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)


def test_cosine_schedule_values() -> None:
    opt = _optimizer()
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2, min_ratio=0.01)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[10] == pytest.approx(0.01)


def test_cosine_schedule_state_dict_round_trip() -> None:
    opt = _optimizer()
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    for _ in range(4):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)

    resumed_opt = _optimizer()
    resumed = cosine_schedule(resumed_opt, total_steps=10, warmup_steps=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.last_epoch == 4
    for optimizer, scheduler in ((opt, sched), (resumed_opt, resumed)):
        optimizer.step()
        scheduler.step()
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_cosine_schedule_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(_optimizer(), total_steps=5, warmup_steps=6)
