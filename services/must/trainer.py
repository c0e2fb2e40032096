"""The MUST training loop: `fit` runs steps, reports progress, checkpoints, resumes and cancels."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from services.must.checkpoint import CheckpointFiles, load_checkpoint, read_latest, save_checkpoint
from services.must.config import MustConfig
from services.must.data import ResumableSampler, mix_seed
from services.must.distributed import broadcast_flag, gather, mean_over_ranks, world
from services.must.errors import Cancelled, CheckpointError
from services.must.masking import cell_size_for, random_cell_mask
from services.must.optim import build_optimizer, cosine_schedule
from services.must.task import MustTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMetrics:
    """What a progress callback receives after every optimizer step."""

    step: int  # steps completed, 1-based
    total_steps: int
    images_per_sec: float
    lr: float
    ema_decay: float
    losses: dict[str, float]
    stats: dict[str, float]
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        rate = self.step / max(self.elapsed_s, 1e-9)
        return (self.total_steps - self.step) / max(rate, 1e-9)


@dataclass
class TrainerHooks:
    """Callbacks into the caller; each is optional and must be cheap or throttle itself."""

    on_step: Callable[[StepMetrics], None] | None = None
    on_checkpoint: Callable[[CheckpointFiles], None] | None = None
    should_cancel: Callable[[], bool] | None = None


@dataclass
class FitResult:
    start_step: int
    end_step: int
    seconds: float
    last: StepMetrics | None
    history: list[dict[str, float]] = field(default_factory=list)


class ViewDataset(Protocol):
    """Maps (index, per-sample seed) to a (weak, strong) pair of image tensors."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]: ...


class SeededPositions(Sampler[tuple[int, int]]):
    """Yields (index, seed) where the seed is a function of the sample's global schedule position.

    In a distributed run every rank walks the same global order and keeps its own slice of each
    global batch (rank r: positions r * per_rank .. (r + 1) * per_rank - 1 of it). An image's
    views therefore depend on the seed, epoch and position only, never on the world size, and
    the sampler's state stays the global position that checkpoints store.
    """

    def __init__(
        self, base: ResumableSampler, seed: int, rank: int = 0, world_size: int = 1, per_rank: int = 1
    ) -> None:
        self.base = base
        self.seed = seed
        self.rank, self.chunk, self.per_rank = rank, per_rank * world_size, per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Starts at a global batch boundary: a fresh run or a checkpoint taken between steps.
        state = self.base.state_dict()
        start = state["epoch"] * self.base.epoch_length + state["index"]
        for k, index in enumerate(self.base):
            if (k % self.chunk) // self.per_rank == self.rank:
                yield index, mix_seed(self.seed, start + k)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the device runs it natively (CUDA with bf16), else fp32; 'fp32' forces fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "bf16":
        return torch.bfloat16
    return None


def loader_workers(cfg: MustConfig, device: torch.device) -> int:
    """DataLoader worker processes: the configured number, else one per spare core on a GPU (up to 8).

    On a GPU, decoding and both augmentations in the main process would leave the device idle
    between steps. On the CPU the step itself needs every core, and loading is a few percent of
    a ViT-B-32 step (bench.training), so the main process does it. The processes torchrun starts
    on one machine (LOCAL_WORLD_SIZE) share its cores.
    """
    if cfg.num_workers is not None:
        return cfg.num_workers
    if device.type != "cuda":
        return 0
    per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(8, max(1, ((os.cpu_count() or 1) - per_machine) // per_machine))


def _loader(dataset: Dataset, sampler: SeededPositions, cfg: MustConfig, device: torch.device) -> DataLoader:
    workers = loader_workers(cfg, device)
    return DataLoader(
        dataset,
        batch_size=sampler.per_rank,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


# "supervised" only in few-label mode.
_LOSS_KEYS = ("loss", "self_training", "fairness", "mim", "align", "supervised")


class _Run:
    """State of one fit() call, so that each phase is a short method."""

    def __init__(
        self, task: MustTask, cfg: MustConfig, device: torch.device, checkpoint_dir: Path | None
    ) -> None:
        if cfg.total_steps is None or cfg.lr is None or cfg.warmup_steps is None:
            raise ValueError("fit needs a resolved config (see config.resolve)")
        self.task, self.cfg, self.device, self.checkpoint_dir = task, cfg, device, checkpoint_dir
        self.world = world()
        self.per_rank = self.world.shard(cfg.batch_size)
        self.student_pass: torch.nn.Module = task.student_pass()
        student = task.student
        self.optimizer = build_optimizer(
            student,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            layer_decay=cfg.layer_decay,
            num_layers=student.num_layers,
        )
        self.scheduler = cosine_schedule(
            self.optimizer,
            total_steps=cfg.total_steps,
            warmup_steps=cfg.warmup_steps,
            min_ratio=cfg.min_lr_ratio,
        )
        self.cell = cfg.mask_cell or cell_size_for(student.patch, student.grid[0] * student.patch)
        self.dtype = autocast_dtype(cfg.precision, device)
        self.start_step = 0
        self.sampler: ResumableSampler | None = None

    def resume(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler
        if self.checkpoint_dir is None:
            return
        state = read_latest(self.checkpoint_dir)
        if state is None:
            return
        if state["step"] > self.cfg.total_steps:
            raise CheckpointError(
                f"checkpoint step {state['step']} is past the schedule's {self.cfg.total_steps}"
            )
        load_checkpoint(self.checkpoint_dir, state, self.task, self.optimizer, self.scheduler)
        sampler.load_state_dict(state["sampler"])
        self.start_step = int(state["step"])
        log.info("resumed from step %d", self.start_step)

    def agree_on_start(self) -> None:
        """Every rank must resume from the same step: on several machines, a checkpoint folder that
        is not shared would let rank 0 resume while the others start over, each its own run."""
        if not self.world.active:
            return
        steps = gather(torch.tensor([self.start_step], device=self.device)).tolist()
        if len(set(steps)) > 1:
            raise CheckpointError(
                f"the ranks found different checkpoints (steps {steps}): every rank must read the same "
                "checkpoint folder (a shared file system on several machines)"
            )

    def distribute(self) -> None:
        """Wrap the student's forward in DDP (after resuming: every rank then holds the same weights)."""
        if not self.world.active:
            return
        cfg = self.cfg
        self.student_pass = DistributedDataParallel(
            self.student_pass,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # A loss weighted 0 leaves its modules (decoder, ln_patch) without gradient.
            find_unused_parameters=cfg.mim_weight == 0 or cfg.align_weight == 0,
        )

    def positions(self, base: ResumableSampler) -> SeededPositions:
        w = self.world
        return SeededPositions(base, self.cfg.seed, w.rank, w.size, self.per_rank)

    def cancel_requested(self, hooks: TrainerHooks) -> bool:
        """Rank 0 asks the caller; every rank gets its answer, so all stop at the same step."""
        wanted = self.world.is_main and hooks.should_cancel is not None and hooks.should_cancel()
        return broadcast_flag(wanted, self.device)

    def checkpoint(self, step: int, hooks: TrainerHooks) -> None:
        # Rank 0 writes: the ranks hold the same weights and the state is the global position.
        if self.checkpoint_dir is None or self.sampler is None or not self.world.is_main:
            return
        consumed = (step - self.start_step) * self.cfg.batch_size
        files = save_checkpoint(
            self.checkpoint_dir,
            step,
            self.task,
            self.optimizer,
            self.scheduler,
            self.sampler.state_after(consumed),
            meta={"config": self.cfg.to_dict()},
        )
        if hooks.on_checkpoint:
            hooks.on_checkpoint(files)

    def step(
        self, step: int, weak: torch.Tensor, strong: torch.Tensor
    ) -> tuple[dict[str, float], float, float]:
        cfg, task = self.cfg, self.task
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed + 1, step))
        # The global batch's masks, of which this rank takes its rows: the same at any world size.
        mask = random_cell_mask(cfg.batch_size, task.student.grid, self.cell, cfg.mask_ratio, gen)
        rows = slice(self.world.rank * self.per_rank, (self.world.rank + 1) * self.per_rank)
        mask = mask[rows].to(self.device)
        weak = weak.to(self.device, non_blocking=True)
        strong = strong.to(self.device, non_blocking=True)
        amp = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        labelled = None
        if task.labelled is not None:
            images, labels = task.labelled.batch(step)
            labelled = (images.to(self.device, non_blocking=True), labels.to(self.device))
        with amp:
            out = task.training_forward(weak, strong, mask, self.student_pass, labelled)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(task.student.parameters(), cfg.grad_clip)
        lr = self.optimizer.param_groups[-1]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        decay = task.update_teacher(step)
        # Each rank's loss terms are its share of the global ones; the statistics are global already.
        names = [k for k in _LOSS_KEYS if k in out]
        losses = mean_over_ranks(torch.stack([out[k].detach().float() for k in names]))
        values = dict(zip(names, losses.tolist(), strict=True))
        values.update({k: float(v) for k, v in out.items() if k not in _LOSS_KEYS})
        return values, lr, decay


def fit(
    task: MustTask,
    dataset: ViewDataset,
    cfg: MustConfig,
    *,
    device: torch.device | str = "cpu",
    checkpoint_dir: Path | None = None,
    hooks: TrainerHooks | None = None,
) -> FitResult:
    """Train `task` for `cfg.total_steps` steps, resuming from `checkpoint_dir/latest.json` if present.

    `cfg` must be resolved (see `config.resolve`). Checkpoints are written every
    `cfg.checkpoint_every` steps, at the end, and on cancellation (then `Cancelled` is raised).
    Under torch.distributed (see `distributed`) each rank trains on its share of the global
    batch `cfg.batch_size` with a DDP student; every rank resumes from `checkpoint_dir`, and
    rank 0 alone calls the hooks and writes checkpoints.
    """
    hooks = hooks or TrainerHooks()
    device = torch.device(device)
    run = _Run(task, cfg, device, checkpoint_dir)
    base = ResumableSampler(len(dataset), cfg.seed)
    run.resume(base)
    run.agree_on_start()
    run.distribute()
    if not run.world.is_main:
        hooks = TrainerHooks()  # progress, checkpoints and cancellation are rank 0's to handle
    total = int(cfg.total_steps or 0)
    task.train()
    history: list[dict[str, float]] = []
    last: StepMetrics | None = None
    start = tick = time.perf_counter()
    if run.start_step >= total:
        return FitResult(run.start_step, run.start_step, 0.0, None, history)
    batches = iter(_loader(dataset, run.positions(base), cfg, device))  # type: ignore[arg-type]
    for step in range(run.start_step, total):
        if run.cancel_requested(hooks):
            run.checkpoint(step, hooks)
            raise Cancelled(f"cancelled at step {step}")
        weak, strong = next(batches)
        values, lr, decay = run.step(step, weak, strong)
        now = time.perf_counter()
        last = StepMetrics(
            step=step + 1,
            total_steps=total,
            images_per_sec=cfg.batch_size / max(now - tick, 1e-9),
            lr=lr,
            ema_decay=decay,
            losses={k: values[k] for k in _LOSS_KEYS if k in values},
            stats={k: v for k, v in values.items() if k not in _LOSS_KEYS},
            elapsed_s=now - start,
        )
        tick = now
        history.append({"step": step + 1, **values})
        if hooks.on_step:
            hooks.on_step(last)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            run.checkpoint(step + 1, hooks)
    return FitResult(run.start_step, total, time.perf_counter() - start, last, history)


def describe(metrics: StepMetrics) -> dict[str, Any]:
    """A flat, JSON-friendly record of one step, for logs and metrics stores."""
    return {
        "step": metrics.step,
        "total_steps": metrics.total_steps,
        "images_per_sec": round(metrics.images_per_sec, 2),
        "lr": metrics.lr,
        "ema_decay": metrics.ema_decay,
        **{k: round(v, 6) for k, v in metrics.losses.items()},
        **{k: round(v, 6) for k, v in metrics.stats.items()},
    }
