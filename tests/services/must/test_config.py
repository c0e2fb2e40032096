from __future__ import annotations

import math

import pytest

from services.must.config import MustConfig, default_epochs, resolve
from services.must.errors import ConfigError


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown hyperparameters: learning_rate, mask_ratoi"):
        MustConfig.from_dict({"batch_size": 32, "mask_ratoi": 0.5, "learning_rate": 1e-4})


def test_from_dict_builds_and_validates() -> None:
    config = MustConfig.from_dict(
        {"batch_size": 32, "mask_ratio": 0.5, "threshold_mode": "per_class_quantile"}
    )
    assert config == MustConfig(batch_size=32, mask_ratio=0.5, threshold_mode="per_class_quantile")
    assert MustConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="mask_ratio"):
        MustConfig.from_dict({"mask_ratio": 1.0})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"mask_ratio": -0.1}, "mask_ratio must be in"),
        ({"threshold_mode": "fixed"}, "'fixed' needs threshold"),
        ({"threshold_mode": "fixed", "threshold": 1.0}, "threshold must be in"),
        ({"batch_size": 1}, "batch_size must be at least 2"),
        ({"total_steps": 0}, "total_steps must be positive"),
        ({"threshold_quantile": 1.0}, "threshold_quantile"),
        ({"layer_decay": 0.0}, "layer_decay"),
        ({"lr": 0.0}, "learning rates must be positive"),
        ({"mim_weight": -1.0}, "loss weights"),
        ({"fairness_samples": 0}, "fairness_samples must be positive"),
        ({"view_agreement": 0.0}, "view_agreement"),
        ({"guard_images": 1}, "guard_images"),
    ],
)
def test_validate_rejects(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MustConfig(**values).validate()  # type: ignore[arg-type]


def test_validate_accepts_fixed_threshold_and_defaults() -> None:
    assert MustConfig().validate() == MustConfig()
    assert MustConfig(threshold_mode="fixed", threshold=0.3).validate().threshold == 0.3
    assert MustConfig(mask_ratio=0.0).validate().mask_ratio == 0.0


# --- resolve(): the documented default rules -----------------------------------------------------


def test_default_epochs_rule() -> None:
    # 60 up to 10k images (the reference's small sets), 30 from 100k (ImageNet), log-linear between.
    assert default_epochs(500) == pytest.approx(60.0)
    assert default_epochs(10_000) == pytest.approx(60.0)
    assert default_epochs(31_623) == pytest.approx(45.0, abs=0.01)
    assert default_epochs(100_000) == pytest.approx(30.0)
    assert default_epochs(1_281_167) == pytest.approx(30.0)


def test_resolve_small_data_set() -> None:
    resolved = resolve(MustConfig(), 500)
    # 60 epochs of 500 images in batches of 64: ceil(468.75) = 469 steps
    assert resolved.total_steps == 469
    assert resolved.batch_size == 64
    assert resolved.lr == pytest.approx(2e-5 * 64 / 256)
    assert resolved.warmup_steps == 23  # 5% of 469
    assert resolved.ema_end == pytest.approx(1 - 2 / 469)  # a time constant of half the run
    assert resolved.ema_start == pytest.approx(0.99)
    assert resolved.ema_warmup_steps == 46  # a tenth of the schedule
    assert resolved.threshold is None
    assert resolved.mask_ratio == 0.1
    assert resolved.strong_crop_min is None  # fitted per job, from the images (views.fit_views)


def test_resolve_imagenet_matches_the_reference_budget() -> None:
    n = 1_281_167
    resolved = resolve(MustConfig(), n)
    # 30 epochs at batch 64; lr x steps equals the reference's (8e-5 x 30 epochs of 1,024-image steps).
    assert resolved.total_steps == math.ceil(30 * n / 64)
    assert resolved.lr == pytest.approx(5e-6)
    reference = 2e-5 * 1024 / 256 * 30 * n / 1024
    assert resolved.lr * resolved.total_steps == pytest.approx(reference, rel=1e-4)
    assert resolved.ema_end == pytest.approx(0.9998)
    assert resolved.ema_start == pytest.approx(0.999)  # 50k images or more
    assert resolved.ema_warmup_steps == 2_000


def test_resolve_medium_data_set() -> None:
    resolved = resolve(MustConfig(batch_size=128), 10_000)
    # 60 epochs of 10,000 images in batches of 128: ceil(4687.5) = 4688 steps
    assert resolved.total_steps == 4_688
    assert resolved.lr == pytest.approx(2e-5 * 128 / 256)
    assert resolved.ema_start == pytest.approx(0.99)
    assert resolved.ema_end == pytest.approx(1 - 2 / 4_688)
    assert resolved.ema_warmup_steps == 468


def test_the_budget_does_not_depend_on_the_batch_size() -> None:
    small, large = resolve(MustConfig(batch_size=32), 20_000), resolve(MustConfig(batch_size=256), 20_000)
    assert small.lr * small.total_steps == pytest.approx(large.lr * large.total_steps, rel=0.01)


def test_resolve_clips_batch_to_the_images_and_keeps_at_least_100_steps() -> None:
    resolved = resolve(MustConfig(batch_size=64), 20)
    assert resolved.batch_size == 20
    assert resolved.total_steps == 100  # 60 epochs of one batch = 60 steps, raised to the minimum
    assert resolved.lr == pytest.approx(2e-5 * 20 / 256)
    assert resolved.ema_warmup_steps == 20


@pytest.mark.parametrize("num_images", [2, 37, 500, 5_000, 49_999, 50_000, 300_000, 2_000_000])
def test_resolve_invariants(num_images: int) -> None:
    resolved = resolve(MustConfig(), num_images)
    steps = resolved.total_steps
    assert steps is not None
    assert 2 <= resolved.batch_size <= 64
    assert resolved.ema_start is not None
    assert resolved.ema_end is not None
    assert resolved.ema_start <= resolved.ema_end <= 0.9998
    time_constant = 1 / (1 - resolved.ema_end)
    assert time_constant <= max(200.0, steps / 2) + 1e-6  # the teacher can move within the run
    assert time_constant >= min(200.0, 1 / (1 - 0.9998)) - 1e-6  # but never chases the student
    assert resolved.ema_warmup_steps is not None
    assert 20 <= resolved.ema_warmup_steps <= 2_000
    assert resolved.warmup_steps is not None
    assert 1 <= resolved.warmup_steps < steps
    expected_steps = max(100, math.ceil(default_epochs(num_images) * num_images / resolved.batch_size))
    assert steps == expected_steps


def test_resolve_keeps_explicit_values() -> None:
    config = MustConfig(
        total_steps=50,
        lr=1e-3,
        warmup_steps=7,
        ema_start=0.5,
        ema_end=0.9,
        ema_warmup_steps=3,
        threshold_mode="fixed",
        threshold=0.4,
    )
    resolved = resolve(config, 500)
    assert resolved.total_steps == 50
    assert resolved.lr == 1e-3
    assert resolved.warmup_steps == 7
    assert resolved.ema_start == 0.5
    assert resolved.ema_end == 0.9
    assert resolved.ema_warmup_steps == 3
    assert resolved.threshold == 0.4
    assert resolve(resolved, 500) == resolved  # idempotent


def test_resolve_caps_default_ema_start_at_explicit_ema_end() -> None:
    resolved = resolve(MustConfig(ema_end=0.95), 1_000)
    assert resolved.ema_end == 0.95
    assert resolved.ema_start == 0.95


def test_resolve_rejects_no_images_and_invalid_configs() -> None:
    with pytest.raises(ConfigError, match="no images"):
        resolve(MustConfig(), 0)
    with pytest.raises(ConfigError, match="batch_size"):
        resolve(MustConfig(batch_size=1), 500)
