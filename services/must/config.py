"""MUST hyperparameters, and the rules that derive unattended defaults from the data set size.

Every field left as None is filled by `resolve()` from the number of unlabeled images:

- schedule: about 20 passes over a small set, fewer over a large one
  (`epochs = clamp(20 * sqrt(10_000 / n), 3, 30)`), at least 100 and at most 20,000 steps;
- EMA teacher: decay ramps linearly from 0.99 (sets under 50k images) or 0.999 to the final
  value over a tenth of the schedule (20..2000 steps). The final value is the paper's 0.9998,
  lowered for short schedules so that the teacher's time constant 1/(1-d) is half the run, but
  never under 200 steps (d >= 0.995). Measured on the tiny CLIP bench: a time constant of a
  tenth of the run lets the teacher chase the student's errors and collapses to chance within
  a hundred steps; half the run keeps it stable while it still moves;
- learning rate: base lr x batch / 256 (the paper's linear scaling), warm-up over 5% of steps;
- confidence threshold: chosen without labels before training, see `threshold_mode`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from services.must.errors import ConfigError

ThresholdMode = Literal["quantile", "per_class_quantile", "fixed"]


@dataclass(frozen=True)
class MustConfig:
    """What a MUST run does; None means 'derive from the data set size' (see module docstring)."""

    total_steps: int | None = None
    batch_size: int = 64
    base_lr: float = 2e-5
    lr: float | None = None
    min_lr_ratio: float = 0.01
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    grad_clip: float | None = 1.0
    # The confidence threshold: "quantile" sets tau to the `threshold_quantile` of the zero-shot
    # teacher's max-probabilities over the data before training (so that fraction starts out
    # below tau); "per_class_quantile" does so within each predicted class; "fixed" uses `threshold`.
    threshold_mode: ThresholdMode = "quantile"
    threshold_quantile: float = 0.5
    threshold: float | None = None
    mask_ratio: float = 0.3
    # Student view: RandomResizedCrop's smallest area fraction and timm's RandAugment policy.
    strong_crop_min: float = 0.3
    rand_augment: str = "rand-n2-m9-mstd0.5-inc1"
    mask_cell: int | None = None
    ema_start: float | None = None
    ema_end: float | None = None
    ema_warmup_steps: int | None = None
    fairness_weight: float = 1.0
    mim_weight: float = 1.0
    align_weight: float = 0.2
    fairness_smoothing_classes: int = 512
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every: int = 200
    # DataLoader processes that decode and augment; None picks by device (see trainer.loader_workers).
    num_workers: int | None = None

    def validate(self) -> MustConfig:
        """Raise ConfigError for values that cannot work."""
        checks = [
            (self.batch_size >= 2, "batch_size must be at least 2"),
            (self.total_steps is None or self.total_steps >= 1, "total_steps must be positive"),
            (0.0 <= self.mask_ratio < 1.0, "mask_ratio must be in [0, 1)"),
            (0.05 <= self.strong_crop_min <= 1.0, "strong_crop_min must be in [0.05, 1]"),
            (self.rand_augment.startswith("rand-"), "rand_augment must be a timm policy such as 'rand-m9'"),
            (0.0 < self.layer_decay <= 1.0, "layer_decay must be in (0, 1]"),
            (0.0 < self.threshold_quantile < 1.0, "threshold_quantile must be in (0, 1)"),
            (
                self.threshold_mode != "fixed" or self.threshold is not None,
                "threshold_mode 'fixed' needs threshold",
            ),
            (self.threshold is None or 0.0 <= self.threshold < 1.0, "threshold must be in [0, 1)"),
            (self.base_lr > 0 and (self.lr is None or self.lr > 0), "learning rates must be positive"),
            (self.checkpoint_every >= 1, "checkpoint_every must be positive"),
            (self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0"),
            (min(self.fairness_weight, self.mim_weight, self.align_weight) >= 0, "loss weights must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MustConfig:
        """Build from a plain dict; unknown keys are a ConfigError naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown hyperparameters: {', '.join(unknown)}")
        return cls(**values).validate()


def default_epochs(num_images: int) -> float:
    return min(30.0, max(3.0, 20.0 * math.sqrt(10_000 / max(1, num_images))))


def resolve(config: MustConfig, num_images: int) -> MustConfig:
    """Fill every None field from the data set size; the result has no None left but `threshold`."""
    config.validate()
    if num_images < 1:
        raise ConfigError("there are no images to train on")
    batch = min(config.batch_size, num_images) if num_images >= 2 else 2
    steps = config.total_steps or int(
        min(20_000, max(100, math.ceil(default_epochs(num_images) * num_images / batch)))
    )
    ema_end = config.ema_end if config.ema_end is not None else min(0.9998, max(0.995, 1.0 - 2.0 / steps))
    ema_start = config.ema_start if config.ema_start is not None else (0.99 if num_images < 50_000 else 0.999)
    return replace(
        config,
        batch_size=batch,
        total_steps=steps,
        lr=config.lr if config.lr is not None else config.base_lr * batch / 256,
        warmup_steps=config.warmup_steps if config.warmup_steps is not None else max(1, steps // 20),
        ema_start=min(ema_start, ema_end),
        ema_end=ema_end,
        ema_warmup_steps=(
            config.ema_warmup_steps
            if config.ema_warmup_steps is not None
            else int(min(2000, max(20, steps // 10)))
        ),
    )
