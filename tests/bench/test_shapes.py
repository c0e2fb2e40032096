"""The synthetic domains are deterministic, balanced and really shifted."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench.shapes import CANVAS, CLASS_NAMES, TargetStyle, _geometry, iter_domain, sample, write_folder


@pytest.mark.parametrize("domain", ["source", "target"])
def test_same_index_and_seed_give_the_same_image(domain: str) -> None:
    a, label_a = sample(domain, 17, seed=3)
    b, label_b = sample(domain, 17, seed=3)
    c, _ = sample(domain, 17, seed=4)
    assert label_a == label_b == 17 % len(CLASS_NAMES)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.size == (32, 32)
    assert a.mode == "RGB"


def test_classes_are_balanced() -> None:
    labels = [label for _, label in iter_domain("target", 50, seed=0)]
    assert np.bincount(labels).tolist() == [5] * len(CLASS_NAMES)


def test_target_is_noisier_than_source() -> None:
    """Plain backgrounds vs gradients with sensor noise: high-frequency energy differs a lot."""

    def roughness(domain: str) -> float:
        images = [np.asarray(im, dtype=np.float32) for im, _ in iter_domain(domain, 40, seed=0)]
        return float(np.mean([np.abs(np.diff(im, axis=1)).mean() for im in images]))

    assert roughness("target") > 1.5 * roughness("source")


def test_target_shapes_are_close_ups_that_may_cross_the_border() -> None:
    """SOURCE shapes stay whole inside the frame; TARGET shapes are bigger and may reach past it."""
    rng = random.Random(0)
    source = [_geometry(rng) for _ in range(500)]
    style = TargetStyle()
    target = [_geometry(rng, style.radius, style.overhang) for _ in range(500)]

    def overhang(geom: tuple[float, float, float, float]) -> float:
        cx, cy, r, _ = geom
        return max(-(cx - r), cx + r - CANVAS, -(cy - r), cy + r - CANVAS) / r

    assert max(overhang(g) for g in source) <= 0.0
    assert max(r for *_, r, _ in source) <= min(r for *_, r, _ in target) + 1e-9
    assert 0.0 < max(overhang(g) for g in target) <= style.overhang + 1e-9


def test_unknown_domain_is_refused() -> None:
    with pytest.raises(ValueError, match="domain"):
        sample("sketch", 0, seed=0)


def test_write_folder(tmp_path) -> None:
    written = write_folder("source", 5, seed=1, out=tmp_path)
    assert [p.name for p, _ in written] == sorted(p.name for p in tmp_path.iterdir())
    assert [label for _, label in written] == [0, 1, 2, 3, 4]
