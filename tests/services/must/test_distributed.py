"""Data-parallel MUST under torchrun, two gloo ranks on the CPU, against one process.

Two ranks with a global batch of 64 (32 each) must train as one process with a batch of 64:
same losses at every step, same weights, teacher, optimizer moments and guard snapshot after
the run; a checkpoint written by either resumes in the other; cancelling stops every rank at
one step; a SIGKILLed rank ends the run without a hang, and a new launch resumes it from the
last checkpoint to the same weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bench.shapes import write_folder
from services.must.adapt import adapt
from services.must.checkpoint import read_latest
from services.must.config import MustConfig
from services.must.data import ResumableSampler, mix_seed
from services.must.distributed import World
from services.must.errors import Cancelled, ConfigError
from services.must.loading import ModelSpec
from services.must.trainer import SeededPositions, StepMetrics, TrainerHooks, describe
from tests.services.must.distributed_driver import CLASSES

REPO = Path(__file__).resolve().parents[3]
CONFIG: dict[str, Any] = {
    "total_steps": 4,
    "batch_size": 64,
    "lr": 1e-3,
    "checkpoint_every": 2,
    "seed": 5,
    "precision": "fp32",
    "num_workers": 0,
    # Fixed views (no fitting pass), with every random augmentation on: per-image seeds matter.
    "strong_crop_min": 0.3,
    "rand_augment": "rand-m9-mstd0.5-inc1",
    "hflip": True,
    "mask_ratio": 0.3,
}
# Summing gradients in another order moves fp32 results by a few ulps per step.
TOL = {"rtol": 1e-4, "atol": 2e-5}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_folder("target", 96, seed=3, out=folder)
    return folder


def _adapt_here(spec: ModelSpec, images: Path, out: Path, cancel_after: int | None = None) -> list[dict]:
    """One process, in this one: the records of the steps it ran."""
    seen: list[StepMetrics] = []
    hooks = TrainerHooks(
        on_step=seen.append,
        should_cancel=lambda: cancel_after is not None and len(seen) >= cancel_after,
    )
    with contextlib.suppress(Cancelled):
        adapt(images, CLASSES, out_dir=out, model=spec, config=MustConfig.from_dict(CONFIG), hooks=hooks)
    return [describe(m) for m in seen]


@pytest.fixture(scope="module")
def reference(micro_clip: ModelSpec, images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted one-process run: its step records and its final checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    records = _adapt_here(micro_clip, images, out)
    return {"records": records, "state": _final_state(out)}


def _torchrun(spec: ModelSpec, images: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "0", "-m", "tests.services.must.distributed_driver",
        "--images", str(images), "--out", str(out), "--model-config", str(spec.config),
        "--checkpoint", str(spec.checkpoint), "--config", json.dumps(CONFIG), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: no process outlives the test
        raise
    if proc.returncode:
        print(output[-4000:])
    return proc.returncode


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    latest = read_latest(out / "checkpoints")
    assert latest is not None
    assert latest["step"] == CONFIG["total_steps"]
    tensors = load_file(str(out / "checkpoints" / latest["weights"]))
    return {k: v for k, v in tensors.items() if k.startswith(("task.", "teacher.", "optim."))}


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(got: list[dict], want: list[dict]) -> None:
    keys = ("loss", "self_training", "fairness", "mim", "align", "confident_fraction", "agreement")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in keys} == pytest.approx({k: w[k] for k in keys}, rel=1e-4, abs=2e-5)


def test_world_shard_splits_the_global_batch() -> None:
    assert World(1, 2).shard(64) == 32
    assert World().shard(7) == 7
    with pytest.raises(ConfigError, match="divisible"):
        World(0, 2).shard(63)


def test_ranks_split_each_global_batch_with_the_positions_seeds() -> None:
    def take(positions: SeededPositions, n: int) -> list[tuple[int, int]]:
        return [item for item, _ in zip(positions, range(n), strict=False)]

    whole = take(SeededPositions(ResumableSampler(10, seed=1), seed=7, per_rank=4), 12)
    ranks = [take(SeededPositions(ResumableSampler(10, seed=1), 7, r, 2, per_rank=2), 6) for r in (0, 1)]
    # Global batches of 4: rank 0 takes the first two items of each, rank 1 the last two.
    assert ranks[0] == whole[0:2] + whole[4:6] + whole[8:10]
    assert ranks[1] == whole[2:4] + whole[6:8] + whole[10:12]
    assert [seed for _, seed in whole] == [mix_seed(7, k) for k in range(12)]


@pytest.mark.distributed
def test_two_ranks_train_as_one_process_with_their_global_batch(
    micro_clip: ModelSpec, images: Path, reference: dict, tmp_path: Path
) -> None:
    assert _finish(_torchrun(micro_clip, images, tmp_path)) == 0
    _assert_same_losses(_records(tmp_path), reference["records"])
    _assert_same_state(_final_state(tmp_path), reference["state"])
    # Rank 0 exported the classifier; no rank wrote a second one.
    assert (tmp_path / "classifier" / "manifest.json").is_file()


@pytest.mark.distributed
def test_two_rank_checkpoint_resumes_in_one_process(
    micro_clip: ModelSpec, images: Path, reference: dict, tmp_path: Path
) -> None:
    assert _finish(_torchrun(micro_clip, images, tmp_path, "--cancel-after", "2")) == 0
    assert (tmp_path / "cancelled").is_file()
    latest = read_latest(tmp_path / "checkpoints")
    assert latest is not None
    assert latest["step"] == 2
    resumed = _adapt_here(micro_clip, images, tmp_path)
    _assert_same_losses(_records(tmp_path) + resumed, reference["records"])
    _assert_same_state(_final_state(tmp_path), reference["state"])


@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_ranks(
    micro_clip: ModelSpec, images: Path, reference: dict, tmp_path: Path
) -> None:
    first = _adapt_here(micro_clip, images, tmp_path, cancel_after=2)
    assert [r["step"] for r in first] == [1, 2]
    assert _finish(_torchrun(micro_clip, images, tmp_path)) == 0
    _assert_same_losses(first + _records(tmp_path), reference["records"])
    _assert_same_state(_final_state(tmp_path), reference["state"])


@pytest.mark.distributed
def test_ranks_that_find_different_checkpoints_refuse_to_train(
    micro_clip: ModelSpec, images: Path, tmp_path: Path
) -> None:
    # Rank 0 checkpoints into its own folder, which rank 1 never sees (no shared file system).
    first = _torchrun(micro_clip, images, tmp_path, "--out-per-rank", "--cancel-after", "2")
    assert _finish(first) == 0
    second = _torchrun(micro_clip, images, tmp_path, "--out-per-rank")
    output, _ = second.communicate(timeout=120)
    assert second.returncode != 0
    assert "the ranks found different checkpoints (steps [2, 0])" in output
    assert not (tmp_path / "rank-0" / "classifier").exists()


def _kill_rank_after_checkpoint(out: Path, proc: subprocess.Popen, rank: int = 1) -> int:
    """SIGKILL one rank once the step-2 checkpoint is written; returns the killed pid."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        latest = (out / "checkpoints" / "latest.json").is_file() and read_latest(out / "checkpoints")
        if latest and latest["step"] == 2:
            pid = int((out / f"rank-{rank}.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise AssertionError("the run never wrote its step-2 checkpoint")


@pytest.mark.distributed
def test_a_killed_rank_ends_the_run_and_a_new_launch_resumes_it(
    micro_clip: ModelSpec, images: Path, reference: dict, tmp_path: Path
) -> None:
    proc = _torchrun(micro_clip, images, tmp_path, "--step-delay", "2")
    _kill_rank_after_checkpoint(tmp_path, proc)
    started = time.monotonic()
    assert _finish(proc, timeout=60) != 0
    assert time.monotonic() - started < 60  # torchrun stops the other rank: nothing hangs in gloo
    survivor = int((tmp_path / "rank-0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)
    latest = read_latest(tmp_path / "checkpoints")
    assert latest is not None
    assert latest["step"] == 2  # the last complete checkpoint is intact
    # As the worker does (worker.rank_restarts): a new torchrun resumes from that checkpoint.
    assert _finish(_torchrun(micro_clip, images, tmp_path)) == 0
    _assert_same_state(_final_state(tmp_path), reference["state"])
