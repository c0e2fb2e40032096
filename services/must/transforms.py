"""Weak, strong and evaluation views of an image, built from the model's preprocessing config."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from open_clip.transform import PreprocessCfg
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS
from torchvision import transforms as T

from services.must import preprocess

# timm's increasing-severity RandAugment ops without PosterizeIncreasing: at magnitudes near 10
# (reached through the magnitude noise) it asks for 0 bits, which Pillow >= 11 rejects.
RAND_AUGMENT_OPS = [op for op in _RAND_INCREASING_TRANSFORMS if op != "PosterizeIncreasing"]

T_out = TypeVar("T_out")

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def _size(cfg: PreprocessCfg) -> int:
    size = cfg.size
    return int(size if isinstance(size, int) else size[0])


def eval_transform(cfg: PreprocessCfg) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's own inference preprocessing (resize, centre crop, normalise), bit for bit.

    The same transform an exported classifier is served with (see `preprocess.eval_transform`).
    """
    return preprocess.eval_transform(cfg)


def weak_transform(cfg: PreprocessCfg) -> Callable[[Image.Image], torch.Tensor]:
    """Teacher view: resize the shorter side, random crop, no flip."""
    size = _size(cfg)
    return T.Compose(
        [
            T.Resize(size, interpolation=_INTERPOLATION.get(cfg.interpolation, T.InterpolationMode.BICUBIC)),
            T.RandomCrop(size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


REFERENCE_POLICY = "rand-n2-m9-mstd0.5-inc1"


def strong_transform(
    cfg: PreprocessCfg, crop_min: float = 0.3, policy: str = REFERENCE_POLICY, hflip: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """Student view: random resized crop (scale crop_min-1), flip, RandAugment (2 ops, magnitude 9)."""
    size = _size(cfg)
    fill = tuple(round(255 * m) for m in cfg.mean)
    flip = [T.RandomHorizontalFlip()] if hflip else []
    return T.Compose(
        [
            T.RandomResizedCrop(
                size,
                scale=(crop_min, 1.0),
                interpolation=_INTERPOLATION.get(cfg.interpolation, T.InterpolationMode.BICUBIC),
            ),
            *flip,
            rand_augment_transform(
                policy,
                {"translate_const": int(size * 0.45), "img_mean": fill},
                transforms=RAND_AUGMENT_OPS,
            ),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def seeded(fn: Callable[[], T_out], seed: int) -> T_out:
    """fn() with torch's CPU, `random`'s and numpy's generators seeded, then restored.

    torchvision draws from torch's global RNG and timm's RandAugment from `random`'s and numpy's;
    seeding all three per sample makes a view a pure function of the sample's position in the
    schedule, whichever worker draws it, which makes resume exact.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed also queues CUDA seeding, ~2 ms a call.
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            return fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class TwoViews:
    """(weak, strong) views of one image, reproducible from a per-sample seed (see `seeded`)."""

    def __init__(
        self,
        cfg: PreprocessCfg,
        crop_min: float = 0.3,
        policy: str = REFERENCE_POLICY,
        hflip: bool = True,
    ) -> None:
        self.weak = weak_transform(cfg)
        self.strong = strong_transform(cfg, crop_min, policy, hflip)

    def __call__(self, image: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return seeded(lambda: (self.weak(image), self.strong(image)), seed)
