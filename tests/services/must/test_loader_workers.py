"""How many DataLoader processes decode and augment for the training loop."""

from __future__ import annotations

import pytest
import torch

from services.must.config import MustConfig
from services.must.errors import ConfigError
from services.must.trainer import loader_workers


def test_a_configured_number_wins_on_every_device() -> None:
    cfg = MustConfig(num_workers=3)

    assert loader_workers(cfg, torch.device("cpu")) == 3
    assert loader_workers(cfg, torch.device("cuda")) == 3


def test_by_default_the_cpu_loads_in_the_main_process_and_a_gpu_uses_workers() -> None:
    cfg = MustConfig()

    assert loader_workers(cfg, torch.device("cpu")) == 0
    # Only the device type is read: no GPU is needed to ask.
    assert 1 <= loader_workers(cfg, torch.device("cuda")) <= 8


def test_a_negative_number_of_workers_is_refused() -> None:
    with pytest.raises(ConfigError, match="num_workers"):
        MustConfig(num_workers=-1).validate()


def test_the_ranks_on_one_machine_share_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.must.trainer.os.cpu_count", lambda: 16)
    cuda = torch.device("cuda")
    assert loader_workers(MustConfig(), cuda) == 8  # one process: 15 spare cores, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun with 4 processes on this machine
    assert loader_workers(MustConfig(), cuda) == 3  # (16 - 4) // 4 each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert loader_workers(MustConfig(), cuda) == 1
