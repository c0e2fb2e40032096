"""Tests for services.must.state_io: pickle-free round trips of optimizer, RNG and scheduler state."""

from __future__ import annotations

import copy
import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from services.must.state_io import (
    capture_rng_state,
    flatten_optimizer_state,
    load_tensors,
    restore_rng_state,
    save_tensors,
    scheduler_state_from_json,
    scheduler_state_to_json,
    unflatten_optimizer_state,
)


def _make_optimizer(model: nn.Linear, amsgrad: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [
            {"params": [model.weight], "lr": 1e-2, "weight_decay": 0.05},
            {"params": [model.bias], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        ],
        amsgrad=amsgrad,
    )


def _step(model: nn.Linear, optimizer: torch.optim.Optimizer, seed: int) -> None:
    inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(inputs).pow(2).sum().backward()
    optimizer.step()


def _json_round_trip(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_optimizer_round_trip_gives_bitwise_equal_next_step(tmp_path: Path, amsgrad: bool) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = _make_optimizer(model, amsgrad)
    for seed in range(3):
        _step(model, optimizer, seed)

    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    assert all(name.startswith("optim.") for name in tensors)
    assert tensors["optim.0.step"].dtype == optimizer.state_dict()["state"][0]["step"].dtype
    save_tensors(tmp_path / "state.safetensors", {**tensors, "model.weight": model.weight})
    loaded = load_tensors(tmp_path / "state.safetensors")

    clone = copy.deepcopy(model)
    fresh = _make_optimizer(clone, amsgrad)
    restored = unflatten_optimizer_state(loaded, _json_round_trip(meta))
    assert restored["param_groups"][1]["betas"] == (0.8, 0.95)
    fresh.load_state_dict(restored)

    _step(model, optimizer, 99)
    _step(clone, fresh, 99)
    assert torch.equal(model.weight, clone.weight)
    assert torch.equal(model.bias, clone.bias)


def test_optimizer_meta_is_json_and_keeps_group_settings() -> None:
    model = nn.Linear(3, 2)
    optimizer = _make_optimizer(model)
    _step(model, optimizer, 0)
    _, meta = flatten_optimizer_state(optimizer.state_dict())
    text = json.dumps(meta)
    groups = json.loads(text)["param_groups"]
    assert groups[0]["values"]["params"] == [0]
    assert groups[1]["values"]["betas"] == [0.8, 0.95]
    assert "betas" in groups[1]["tuple_keys"]


def test_unflatten_reports_missing_tensor() -> None:
    model = nn.Linear(3, 2)
    optimizer = _make_optimizer(model)
    _step(model, optimizer, 0)
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    del tensors["optim.1.exp_avg"]
    with pytest.raises(KeyError, match="optim.1.exp_avg"):
        unflatten_optimizer_state(tensors, meta)


def _draw() -> tuple[list[float], float, list[float], float]:
    return (
        torch.rand(5).tolist(),
        random.random(),
        np.random.rand(5).tolist(),
        random.gauss(0.0, 1.0),
    )


def test_rng_round_trip_through_file(tmp_path: Path) -> None:
    random.gauss(0.0, 1.0)  # leaves a cached gauss_next to be restored too
    np.random.randn()  # leaves numpy's cached gaussian set
    tensors, meta = capture_rng_state()
    assert tensors["rng.torch"].dtype == torch.uint8
    assert tensors["rng.numpy"].dtype == torch.uint32
    save_tensors(tmp_path / "rng.safetensors", tensors)
    meta = _json_round_trip(meta)

    expected = (*_draw(), np.random.randn())
    restore_rng_state(load_tensors(tmp_path / "rng.safetensors"), meta)
    assert (*_draw(), np.random.randn()) == expected


def _warmup(epoch: int, warmup: int) -> float:
    return min(1.0, (epoch + 1) / warmup)


def test_scheduler_round_trip_with_partial() -> None:
    model = nn.Linear(3, 2)
    optimizer = _make_optimizer(model)
    lr_lambda = functools.partial(_warmup, warmup=10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    for seed in range(3):
        _step(model, optimizer, seed)
        scheduler.step()

    saved = json.loads(json.dumps(scheduler_state_to_json(scheduler.state_dict())))
    fresh_optimizer = _make_optimizer(copy.deepcopy(model))
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, functools.partial(_warmup, warmup=10))
    fresh.load_state_dict(scheduler_state_from_json(saved))
    assert "lr_lambdas" in saved  # the caller's dict is left intact
    assert fresh.last_epoch == scheduler.last_epoch == 3
    assert fresh.get_last_lr() == scheduler.get_last_lr()
    scheduler.step()
    fresh.step()
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_scheduler_to_json_rejects_tensors() -> None:
    with pytest.raises(TypeError, match="scheduler.base_lrs"):
        scheduler_state_to_json({"base_lrs": [torch.tensor(1.0)]})


def test_save_tensors_handles_shared_views_and_non_contiguous(tmp_path: Path) -> None:
    base = torch.arange(12.0, requires_grad=True)
    tied = nn.Linear(2, 2)
    tensors = {
        "base": base,
        "view": base[2:6],
        "transposed": torch.arange(6.0).reshape(2, 3).t(),
        "tied_a": tied.weight,
        "tied_b": tied.weight,
        "scalar": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "t.safetensors"
    save_tensors(path, tensors, metadata={"kind": "test"})
    loaded = load_tensors(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.detach()), name
    assert not list(tmp_path.glob(".*.tmp"))
