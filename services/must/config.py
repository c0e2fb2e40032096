"""MUST hyperparameters, and the rules that derive unattended defaults from the data set size.

Every field left as None is filled by `resolve()` from the number of unlabeled images n, or
per job from the images themselves (the student's views, see `views.py`; the threshold, see
`calibration.py`).

The schedule and learning rate come from the reference implementation's published per-data-set
configs (salesforce/MUST, `train_configs.json` and `train.py`), which train with a global batch of
1,024 (16 GPUs x 64), `lr = cfg_lr * 1024 / 256`, no warm-up:

    ViT-B/16   data set      n (train)  epochs  cfg_lr
               ImageNet      1.28M      30      2e-5
               Food101       75.8k      40      2e-5
               GTSRB         26.6k      20      2e-5
               SUN397        ~20-76k    20      1e-4
               UCF101        9.5k       60      1e-5
               DTD           3.8k       60      2e-5
               Pets          3.7k       60      1e-5
               Caltech101    3.1k       60      1e-5

- schedule: 60 epochs up to 10k images and 30 from 100k, log-linear between
  (`default_epochs`): the reference's small sets all use 60 and ImageNet 30; its three
  middle-sized sets (20, 20, 40) straddle the interpolation. steps = ceil(epochs * n / batch),
  at least 100. The step count follows from the images seen, so it does not depend on the
  batch size;
- learning rate: base lr 2e-5 (the reference's value on four of its six ViT-B/16 data sets)
  times batch / 256, the reference's own linear scaling. lr x steps is then the reference's for
  any batch size; 5% warm-up and a per-step cosine to 1% (the reference used no warm-up, which
  a fresh mask token and a few thousand steps do not afford);
- EMA teacher: decay ramps linearly from 0.99 (sets under 50k images) or 0.999 to the final
  value over a tenth of the schedule (20..2000 steps). The final value is the paper's 0.9998,
  lowered for short schedules so that the teacher's time constant 1/(1-d) is half the run, but
  never under 200 steps (d >= 0.995). Measured on the tiny CLIP bench: a time constant of a
  tenth of the run lets the teacher chase the student's errors and collapses to chance within
  a hundred steps; half the run keeps it stable while it still moves;
- mask ratio 0.1: the reference's value on 6 of its 8 ViT-B/16 configs (0.3 on ImageNet, 0.5
  on GTSRB);
- fairness: the mean prediction is estimated over `fairness_samples` (~1,000, the reference's
  global batch) or 3 per class if more, at any batch size, see `losses.fairness_loss`;
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
    mask_ratio: float = 0.1
    # Student view: RandomResizedCrop's smallest area fraction, timm's RandAugment policy and the
    # horizontal flip. None: fitted per job without labels (views.fit_views): the strongest level
    # of views.LADDER at which the zero-shot teacher still agrees with itself between its weak
    # view and the masked strong view on `view_agreement` of a sample of the images.
    strong_crop_min: float | None = None
    rand_augment: str | None = None
    hflip: bool | None = None
    view_agreement: float = 0.8
    mask_cell: int | None = None
    ema_start: float | None = None
    ema_end: float | None = None
    ema_warmup_steps: int | None = None
    fairness_weight: float = 1.0
    mim_weight: float = 1.0
    align_weight: float = 0.2
    # Images the fairness term's mean prediction is estimated over; None: the reference's global
    # batch of 1,024, or 3 per class from 342 classes on (see losses.fairness_window).
    fairness_samples: int | None = None
    # The label-free guard (guard.py): how many of the images score the candidates, and by how
    # much an adapted classifier's margin must beat zero-shot's to be served.
    guard_images: int = 2048
    guard_margin: float = 0.0
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
            (
                self.strong_crop_min is None or 0.05 <= self.strong_crop_min <= 1.0,
                "strong_crop_min must be in [0.05, 1]",
            ),
            (
                self.rand_augment is None or self.rand_augment.startswith("rand-"),
                "rand_augment must be a timm policy such as 'rand-m9'",
            ),
            (0.0 < self.view_agreement <= 1.0, "view_agreement must be in (0, 1]"),
            (
                self.fairness_samples is None or self.fairness_samples >= 1,
                "fairness_samples must be positive",
            ),
            (self.guard_images >= 2, "guard_images must be at least 2"),
            (-1.0 <= self.guard_margin <= 1.0, "guard_margin must be in [-1, 1]"),
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
    """60 passes over sets up to 10k images, 30 from 100k, log-linear between (see module docstring)."""
    n = max(1, num_images)
    if n <= 10_000:
        return 60.0
    if n >= 100_000:
        return 30.0
    return 60.0 - 30.0 * math.log10(n / 10_000)


def resolve(config: MustConfig, num_images: int) -> MustConfig:
    """Fill every None field from the data set size; the result has no None left but `threshold`."""
    config.validate()
    if num_images < 1:
        raise ConfigError("there are no images to train on")
    batch = min(config.batch_size, num_images) if num_images >= 2 else 2
    steps = config.total_steps or max(100, math.ceil(default_epochs(num_images) * num_images / batch))
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
