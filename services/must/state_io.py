"""Training state as safetensors tensors plus a JSON-able dict, so checkpoints never involve pickle."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

OPTIM_PREFIX = "optim."
_GROUP_PREFIX = "optim.group."
_TORCH_RNG = "rng.torch"
_NUMPY_RNG = "rng.numpy"
_CUDA_RNG_PREFIX = "rng.cuda."


def _to_json(value: Any, where: str) -> Any:
    """Return value with tuples turned into lists, or raise TypeError if it cannot be stored as JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        bad = [key for key in value if not isinstance(key, str)]
        if bad:
            raise TypeError(f"{where}: JSON needs string keys, got {bad!r}")
        return {key: _to_json(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(f"{where}: cannot store {type(value).__name__} as JSON")


def _split_entry(entry: dict[str, Any], prefix: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Move an entry's tensors into `tensors` under prefix+key; describe the rest as JSON."""
    values: dict[str, Any] = {}
    tuple_keys: list[str] = []
    tensor_keys: list[str] = []
    for key, value in entry.items():
        if isinstance(value, Tensor):
            tensors[prefix + key] = value
            tensor_keys.append(key)
            continue
        if isinstance(value, tuple):
            tuple_keys.append(key)
        values[key] = _to_json(value, prefix + key)
    return {"values": values, "tuple_keys": tuple_keys, "tensor_keys": tensor_keys}


def _join_entry(meta: dict[str, Any], prefix: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Inverse of _split_entry."""
    tuple_keys = set(meta["tuple_keys"])
    entry = {key: tuple(value) if key in tuple_keys else value for key, value in meta["values"].items()}
    for key in meta["tensor_keys"]:
        name = prefix + key
        if name not in tensors:
            raise KeyError(f"optimizer tensor {name!r} missing from checkpoint")
        entry[key] = tensors[name]
    return entry


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split optimizer.state_dict() into tensors named 'optim.{param_idx}.{key}' and a JSON-able dict."""
    tensors: dict[str, Tensor] = {}
    entries = [
        {"id": param_id, **_split_entry(param_state, f"{OPTIM_PREFIX}{param_id}.", tensors)}
        for param_id, param_state in state["state"].items()
    ]
    groups = [
        _split_entry(group, f"{_GROUP_PREFIX}{g}.", tensors) for g, group in enumerate(state["param_groups"])
    ]
    return tensors, {"state": entries, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a dict that optimizer.load_state_dict accepts from flatten_optimizer_state's output."""
    optim_tensors = {name: t for name, t in tensors.items() if name.startswith(OPTIM_PREFIX)}
    state = {
        entry["id"]: _join_entry(entry, f"{OPTIM_PREFIX}{entry['id']}.", optim_tensors)
        for entry in meta["state"]
    }
    groups = [
        _join_entry(group, f"{_GROUP_PREFIX}{g}.", optim_tensors)
        for g, group in enumerate(meta["param_groups"])
    ]
    return {"state": state, "param_groups": groups}


def capture_rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Snapshot the torch (CPU and CUDA), python `random` and numpy global RNGs."""
    tensors: dict[str, Tensor] = {_TORCH_RNG: torch.get_rng_state()}
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, cuda_state in enumerate(cuda_states):
        tensors[f"{_CUDA_RNG_PREFIX}{i}"] = cuda_state
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors[_NUMPY_RNG] = torch.from_numpy(np.array(keys, dtype=np.uint32))
    meta = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "cuda_devices": len(cuda_states),
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Restore the RNGs captured by capture_rng_state; CUDA states are skipped for absent devices."""
    torch.set_rng_state(tensors[_TORCH_RNG].to("cpu", torch.uint8))
    _restore_cuda_rng(tensors, int(meta.get("cuda_devices", 0)))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npm = meta["numpy"]
    keys = tensors[_NUMPY_RNG].to("cpu").numpy().astype(np.uint32)
    np.random.set_state((npm["bit_generator"], keys, npm["pos"], npm["has_gauss"], npm["cached_gaussian"]))


def _restore_cuda_rng(tensors: dict[str, Tensor], saved_devices: int) -> None:
    """Restore per-device CUDA RNG states where both the checkpoint and this machine have the device."""
    if saved_devices == 0 or not torch.cuda.is_available():
        return
    for i in range(min(saved_devices, torch.cuda.device_count())):
        torch.cuda.set_rng_state(tensors[f"{_CUDA_RNG_PREFIX}{i}"].to("cpu", torch.uint8), device=i)


def scheduler_state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """Make an LR scheduler state_dict JSON-serialisable (tuples become lists; anything else raises)."""
    return _to_json(state, "scheduler")


def scheduler_state_from_json(d: dict[str, Any]) -> dict[str, Any]:
    """Return a scheduler state_dict for load_state_dict; a copy, because LambdaLR pops keys from it."""
    if not isinstance(d, dict):
        raise TypeError(f"scheduler state must be a dict, got {type(d).__name__}")
    return copy.deepcopy(d)


def _prepare_for_save(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors with no two sharing storage (safetensors refuses shared memory)."""
    prepared: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storages:
            t = t.clone()
        elif ptr:
            seen_storages.add(ptr)
        prepared[name] = t
    return prepared


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file, atomically so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_prepare_for_save(tensors), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """Read every tensor of a safetensors file onto device."""
    return load_file(str(path), device=device)
