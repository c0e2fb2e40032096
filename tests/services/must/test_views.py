"""Fitting the student's view strength without labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from services.must.loading import load_clip
from services.must.network import MustNetwork
from services.must.views import (
    LADDER,
    ViewFitter,
    ViewLevel,
    _Sample,
    fit_views,
    sample_paths,
    seeded_batches,
)


class _FakeFitter:
    """Agreements set by hand per level, to test the rule alone."""

    def __init__(self, agreements: dict[float, float], flip: float) -> None:
        self.agreements, self.flip, self.asked = agreements, flip, []

    def weak_sample(self) -> _Sample:
        return _Sample(torch.zeros(100, dtype=torch.long), self.flip)

    def agreement(self, level: ViewLevel, hflip: bool, weak_pred: torch.Tensor) -> float:
        self.asked.append((level.crop_min, hflip))
        return self.agreements[level.crop_min]


def test_the_strongest_level_that_reaches_the_target_is_chosen() -> None:
    fitter = _FakeFitter({0.3: 0.4, 0.5: 0.55, 0.7: 0.72, 0.85: 0.8, 0.95: 0.9}, flip=0.95)
    fit = fit_views(fitter, target=0.7)  # type: ignore[arg-type]
    assert (fit.crop_min, fit.rand_augment) == (LADDER[2].crop_min, LADDER[2].policy)
    assert fit.hflip is True
    assert fit.agreement == pytest.approx(0.72)
    # Levels are measured strongest first and the search stops at the first that passes.
    assert [a for a, _ in fitter.asked] == [0.3, 0.5, 0.7]
    assert [lvl["agreement"] for lvl in fit.levels] == pytest.approx([0.4, 0.55, 0.72])


def test_no_level_reaches_the_target_gives_the_mildest_and_a_flip_that_changes_classes_is_dropped() -> None:
    fitter = _FakeFitter({0.3: 0.1, 0.5: 0.2, 0.7: 0.3, 0.85: 0.4, 0.95: 0.5}, flip=0.6)
    fit = fit_views(fitter, target=0.9)  # type: ignore[arg-type]
    assert fit.crop_min == LADDER[-1].crop_min
    assert fit.hflip is False
    assert all(hflip is False for _, hflip in fitter.asked)
    assert fit.to_dict()["flip_agreement"] == pytest.approx(0.6)


def _write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(count):
        # Left half bright or dark: a mirror image moves it, which a position-sensitive model sees.
        image = Image.new("RGB", (32, 32), (20, 20, 20))
        image.paste((200 + i % 50, 100, 30 * (i % 8)), (0, 0, 16, 32))
        path = folder / f"{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def test_measured_agreement_is_reproducible_and_bounded(
    tmp_path: Path, micro_network: MustNetwork, micro_clip
) -> None:
    paths = _write_images(tmp_path / "images", 24)
    preprocess = load_clip(micro_clip).preprocess
    fitter = ViewFitter(
        micro_network, preprocess, paths, mask_ratio=0.1, seed=0, device=torch.device("cpu"), mask_cell=1
    )
    sample = fitter.weak_sample()
    assert len(sample.weak_pred) == 24
    assert 0.0 <= sample.flip_agreement <= 1.0
    strong, mild = (
        fitter.agreement(LADDER[0], True, sample.weak_pred),
        fitter.agreement(LADDER[-1], False, sample.weak_pred),
    )
    assert 0.0 <= strong <= 1.0
    assert 0.0 <= mild <= 1.0
    assert fitter.agreement(LADDER[0], True, sample.weak_pred) == strong  # seeded: the same views again


def test_seeded_batches_repeat_and_sample_paths_spread(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "images", 10)

    def views(image: Image.Image, seed: int) -> torch.Tensor:
        return torch.tensor([seed % 1000])

    first = torch.cat(list(seeded_batches(paths, views, seed=3, batch_size=4)))
    again = torch.cat(list(seeded_batches(paths, views, seed=3, batch_size=4)))
    other = torch.cat(list(seeded_batches(paths, views, seed=4, batch_size=4)))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert sample_paths(paths, 50) == paths
    five = sample_paths(paths, 5)
    assert len(five) == 5
    assert five == sorted(five)
    assert five == sample_paths(paths, 5)  # seeded


def test_sample_paths_does_not_alias_with_names_that_cycle_through_classes() -> None:
    paths = [Path(f"{i:05d}.png") for i in range(10_000)]  # image i is of class i % 10
    classes = {int(p.stem) % 10 for p in sample_paths(paths, 2048)}
    assert classes == set(range(10))
