"""Training checkpoints as safetensors + JSON, with `latest.json` written last.

A checkpoint at step k is `step-{k:06d}.safetensors` (student, teacher, task buffers, optimizer
moments, RNG states) and `step-{k:06d}.state.json` (step, config, optimizer groups, scheduler,
sampler position, RNG metadata, sha256 of the weights file). `latest.json` points at the newest
complete one and is only replaced after both files are in place, so a reader never sees a
pointer to a partial checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.must.errors import CheckpointError
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

if TYPE_CHECKING:  # for annotations only: the task brings the training modules
    from services.must.task import MustTask

FORMAT_VERSION = 1
LATEST = "latest.json"


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint, in the order a copy to another store must publish them."""

    step: int
    weights: Path
    state: Path
    pointer: Path

    def publish_order(self) -> list[Path]:
        return [self.weights, self.state, self.pointer]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_checkpoint(
    directory: Path,
    step: int,
    task: MustTask,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int | None = 2,
) -> CheckpointFiles:
    """Write the checkpoint for `step` and point `latest.json` at it; prune older local ones."""
    directory.mkdir(parents=True, exist_ok=True)
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
    rng_tensors, rng_meta = capture_rng_state()
    tensors = {
        **_prefixed("task.", task.state_dict()),
        **_prefixed("teacher.", task.teacher.state_dict()),
        **optim_tensors,
        **rng_tensors,
    }
    weights = directory / f"step-{step:06d}.safetensors"
    save_tensors(weights, tensors, metadata={"format": "must-checkpoint", "step": str(step)})
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "weights": weights.name,
        "weights_sha256": sha256_file(weights),
        "optimizer": optim_meta,
        "scheduler": scheduler_state_to_json(scheduler.state_dict()),
        "sampler": sampler_state,
        "rng": rng_meta,
        "meta": meta or {},
    }
    state_path = directory / f"step-{step:06d}.state.json"
    write_json_atomic(state_path, state)
    pointer = directory / LATEST
    write_json_atomic(pointer, {"step": step, "weights": weights.name, "state": state_path.name})
    if keep_last:
        _prune(directory, keep_last)
    return CheckpointFiles(step, weights, state_path, pointer)


def _prune(directory: Path, keep_last: int) -> None:
    states = sorted(directory.glob("step-*.state.json"))
    for old in states[:-keep_last]:
        old.unlink(missing_ok=True)
        (directory / old.name.replace(".state.json", ".safetensors")).unlink(missing_ok=True)


def read_latest(directory: Path) -> dict[str, Any] | None:
    """The state JSON of the newest complete checkpoint in `directory`, or None when there is none."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    try:
        latest = json.loads(pointer.read_text())
        state = json.loads((directory / latest["state"]).read_text())
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint pointer {pointer} is unreadable: {exc}") from exc
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {state.get('format_version')} is not supported")
    return state


def load_checkpoint(
    directory: Path,
    state: dict[str, Any],
    task: MustTask,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore task, teacher, optimizer, scheduler and RNGs from the checkpoint `state` describes."""
    weights = directory / state["weights"]
    if not weights.is_file() or sha256_file(weights) != state["weights_sha256"]:
        raise CheckpointError(f"checkpoint weights {weights} are missing or do not match their checksum")
    device = next(task.student.parameters()).device
    tensors = load_tensors(weights, device=str(device))
    try:
        task.load_state_dict(_strip("task.", tensors))
        task.teacher.load_state_dict(_strip("teacher.", tensors))
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {weights.name} does not match this job's model: {exc}") from exc
    scheduler.load_state_dict(scheduler_state_from_json(state["scheduler"]))
    restore_rng_state({k: v.cpu() for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])
