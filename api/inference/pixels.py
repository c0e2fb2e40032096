"""A classifier's preprocessing, split between the decoding threads and the forward thread.

The decoding threads run only PIL work (decode, resize, crop), which releases the GIL, and hand
over 8-bit pixels. Turning them into normalised floats is one batched tensor operation done
where the forward runs. So no torch operation runs outside the forward thread: torch's
intra-op threads then never compete with a second team of their own, which on a small CPU
costs far more than the work itself, and queued batches take a quarter of the memory.

The split is the one `EvalTransform` exposes (`to_image`, then the `ToTensor` + `Normalize`
arithmetic), so serving needs no torchvision. A classifier whose transform is open_clip's
torchvision pipeline (a resize mode EvalTransform does not cover) is split at that pipeline's
`ToTensor`, `Normalize` tail; torchvision is loaded already when such a transform exists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.must.inference import ImageClassifier
from services.must.preprocess import EvalTransform


@dataclass(frozen=True)
class PixelSteps:
    """The PIL part of a preprocessing pipeline and the normalisation that follows `ToTensor`."""

    to_image: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def pixel_steps(classifier: ImageClassifier) -> PixelSteps | None:
    """The split of `classifier.transform`, or None when it has none."""
    transform = classifier.transform
    if isinstance(transform, EvalTransform):
        return PixelSteps(transform.to_image, transform.mean, transform.std)
    return _torchvision_steps(transform)


def _torchvision_steps(transform: Any) -> PixelSteps | None:
    """The split of a torchvision Compose that ends in ToTensor, Normalize."""
    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 2 or "torchvision" not in sys.modules:
        return None
    from torchvision import transforms as T

    if not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    normalize: T.Normalize = steps[-1]
    return PixelSteps(T.Compose(steps[:-2]), tuple(normalize.mean), tuple(normalize.std))


def prepare(steps: PixelSteps, image: Image.Image) -> np.ndarray:
    """[H, W, C] uint8 pixels of one image after the PIL steps (converted to RGB first)."""
    return np.asarray(steps.to_image(image if image.mode == "RGB" else image.convert("RGB")))


def stack(prepared: Sequence[np.ndarray]) -> torch.Tensor:
    """[B, C, H, W] uint8 pixels from `prepare`d images."""
    batch = np.stack(prepared)
    # numpy, not torch, makes it channels-first: a torch copy here would start its own thread team.
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def to_uint8(steps: PixelSteps, images: Sequence[Image.Image]) -> torch.Tensor:
    """[B, C, H, W] uint8 pixels of images after the PIL steps."""
    return stack([prepare(steps, image) for image in images])


def normalize(pixels: torch.Tensor, classifier: ImageClassifier) -> torch.Tensor:
    """Float pixels normalised as `ToTensor` + `Normalize` would (the same operations, batched).

    A float batch is taken to be normalised already (the classifier's own preprocessing).
    """
    if pixels.is_floating_point():
        return pixels
    steps = pixel_steps(classifier)
    if steps is None:
        raise ValueError("8-bit pixels for a classifier whose preprocessing cannot be split")
    mean = torch.as_tensor(steps.mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    std = torch.as_tensor(steps.std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)
