from __future__ import annotations

import pytest
import torch
from torch import nn

from services.must.calibration import choose_threshold, teacher_confidence
from services.must.config import MustConfig

# Shuffled 0.1, 0.2, ..., 0.9, 0.95.
CONFIDENCE = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.8, 0.3, 0.7, 0.5, 0.1, 0.95])


def _hand_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of a list, computed by hand from the sorted values."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def test_hand_quantile_helper() -> None:
    assert _hand_quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert _hand_quantile([1.0, 2.0], 0.25) == pytest.approx(1.25)


def test_quantile_threshold() -> None:
    predictions = torch.zeros(10, dtype=torch.long)
    tau = choose_threshold(CONFIDENCE, predictions, 10, MustConfig(threshold_quantile=0.5))
    # sorted: 0.1 ... 0.9, 0.95; position 4.5 -> halfway between 0.5 and 0.6
    assert tau.ndim == 0
    assert float(tau) == pytest.approx(0.55)
    assert float(tau) == pytest.approx(_hand_quantile(CONFIDENCE.tolist(), 0.5))

    tau = choose_threshold(CONFIDENCE, predictions, 10, MustConfig(threshold_quantile=0.25))
    assert float(tau) == pytest.approx(0.325)  # position 2.25 -> 0.3 + 0.25 * 0.1


def test_threshold_never_below_uniform_guess() -> None:
    predictions = torch.zeros(10, dtype=torch.long)
    cfg = MustConfig(threshold_quantile=0.25)
    assert float(choose_threshold(CONFIDENCE, predictions, 2, cfg)) == pytest.approx(0.5)  # 1/K > 0.325
    assert float(choose_threshold(CONFIDENCE, predictions, 4, cfg)) == pytest.approx(0.325)  # 1/K < 0.325


def test_threshold_never_above_ceiling() -> None:
    confident = torch.full((20,), 0.999)
    tau = choose_threshold(confident, torch.zeros(20, dtype=torch.long), 5, MustConfig())
    assert float(tau) == pytest.approx(0.99)


def test_fixed_threshold_ignores_the_data() -> None:
    cfg = MustConfig(threshold_mode="fixed", threshold=0.42)
    tau = choose_threshold(CONFIDENCE, torch.zeros(10, dtype=torch.long), 10, cfg)
    assert tau.ndim == 0
    assert float(tau) == pytest.approx(0.42)


def test_per_class_quantile() -> None:
    num_classes = 4
    crowded = torch.linspace(0.30, 0.96, 12)  # class 0: 12 predictions, enough for its own tau
    sparse = torch.tensor([0.99, 0.98, 0.97])  # class 2: 3 predictions, falls back to global
    confidence = torch.cat([crowded, sparse])
    predictions = torch.cat([torch.zeros(12, dtype=torch.long), torch.full((3,), 2)])
    cfg = MustConfig(threshold_mode="per_class_quantile", threshold_quantile=0.5)

    taus = choose_threshold(confidence, predictions, num_classes, cfg)

    global_tau = _hand_quantile(confidence.tolist(), 0.5)
    assert taus.shape == (num_classes,)
    assert float(taus[0]) == pytest.approx(_hand_quantile(crowded.tolist(), 0.5))
    assert float(taus[0]) != pytest.approx(global_tau)
    assert float(taus[2]) == pytest.approx(global_tau)  # too few predictions
    assert float(taus[1]) == pytest.approx(global_tau)  # no predictions at all
    assert float(taus[3]) == pytest.approx(global_tau)


def test_per_class_quantile_respects_min_per_class_and_clamps() -> None:
    confidence = torch.tensor([0.1, 0.15, 0.2, 0.9, 0.95, 0.99])
    predictions = torch.tensor([0, 0, 0, 1, 1, 1])
    cfg = MustConfig(threshold_mode="per_class_quantile", threshold_quantile=0.5)

    taus = choose_threshold(confidence, predictions, 3, cfg, min_per_class=3)

    assert float(taus[0]) == pytest.approx(1 / 3)  # its own median 0.15, raised to 1/K
    assert float(taus[1]) == pytest.approx(0.95)
    assert float(taus[2]) == pytest.approx(_hand_quantile(confidence.tolist(), 0.5))  # 0.55


class _FixedLogits(nn.Module):
    """Stands in for a MustNetwork: logits are the first K pixel values of each image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, : self.num_classes]


def test_teacher_confidence_over_batches() -> None:
    images = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    network = _FixedLogits(num_classes=3).train()

    conf, pred = teacher_confidence(network, [images[:2], images[2:]], "cpu")  # type: ignore[arg-type]

    probs = images.flatten(1)[:, :3].softmax(-1)
    assert not network.training
    torch.testing.assert_close(conf, probs.max(dim=1).values)
    assert torch.equal(pred, probs.argmax(dim=1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_calibration_measures_the_weak_view_in_training_precision(
    micro_clip, tmp_path, precision: str
) -> None:
    """tau is the quantile of the teacher's probabilities on the seeded weak views, under training's
    autocast: what training compares it with, not the eval view in fp32."""
    from bench.shapes import write_folder
    from services.must.adapt import _WeakView, calibrate, prepare
    from services.must.config import resolve
    from services.must.transforms import weak_transform
    from services.must.views import seeded_batches

    write_folder("target", 48, seed=5, out=tmp_path)
    paths = sorted(tmp_path.glob("*.png"))
    prepared = prepare(micro_clip, ["circle", "square", "triangle"])
    cfg = resolve(MustConfig(precision=precision, threshold_quantile=0.3), len(paths))
    device = torch.device("cpu")

    tau = float(calibrate(prepared, paths, cfg, device))

    weak = seeded_batches(paths, _WeakView(weak_transform(prepared.clip.preprocess)), cfg.seed)
    dtype = torch.bfloat16 if precision == "bf16" else None
    conf, _ = teacher_confidence(prepared.network, weak, device, dtype)
    assert tau == pytest.approx(float(torch.quantile(conf, 0.3)), abs=1e-7)
    # In bf16 the tower's rounding moves the confidences, so fp32 would have given another tau.
    conf_fp32, _ = teacher_confidence(prepared.network, weak, device, None)
    if precision == "bf16":
        assert not torch.equal(conf, conf_fp32)
