"""A classifier's evaluation preprocessing, described by its manifest and run with PIL and numpy.

open_clip's eval transform (`image_transform_v2(cfg, is_train=False)`) is built from torchvision
transforms, and importing open_clip brings torchvision, timm and huggingface_hub into the
process: a few hundred MB that a serving process does not need. `EvalTransform` takes the same
steps with the same PIL calls (resize, centre crop, RGB, then `ToTensor` and `Normalize`'s float
arithmetic), so its output is bit-identical to open_clip's for the resize modes "shortest" and
"squash". `eval_transform` falls back to open_clip's own transform, imported on demand, for
anything else ("longest", an unknown interpolation).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# CLIP's normalisation, the default of open_clip's PreprocessCfg.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's interpolation names and the PIL filters torchvision resizes PIL images with
# ("random" only means something for training; open_clip evaluates it as bicubic).
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "random": Image.Resampling.BICUBIC,
}
SUPPORTED_RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class PreprocessConfig:
    """The `preprocess` of a manifest: the fields of open_clip's PreprocessCfg, with its defaults."""

    size: int | tuple[int, int] = 224
    mode: str = "RGB"
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def of(cls, cfg: Any) -> PreprocessConfig:
        """From a manifest's dict, open_clip's PreprocessCfg or another config with these fields."""
        if isinstance(cfg, PreprocessConfig):
            return cfg
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            cfg = asdict(cfg)
        if not isinstance(cfg, Mapping):
            raise TypeError(
                f"a preprocessing config must be a mapping or a dataclass, not {type(cfg).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cfg.items() if k in known and v is not None}
        for name in ("size", "mean", "std"):
            if isinstance(values.get(name), list | tuple):
                values[name] = tuple(values[name])
        return cls(**values)

    @property
    def height_width(self) -> tuple[int, int]:
        """The (height, width) the images are cropped to."""
        if isinstance(self.size, int):
            return self.size, self.size
        return int(self.size[0]), int(self.size[1])


def preprocess_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly copy of a preprocessing config (tuples become lists)."""
    data = asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else dict(cfg)
    return json.loads(json.dumps(data))


def _channels(values: Any) -> tuple[float, ...]:
    """open_clip's mean/std rule: one number stands for all three channels."""
    return tuple(float(v) for v in values) if isinstance(values, list | tuple) else (float(values),) * 3


class EvalTransform:
    """open_clip's eval transform with PIL and numpy: a PIL image in, a float [3, H, W] tensor out.

    The split is public so that callers may batch the tensor step: `to_image` is the PIL part
    (resize, centre crop, RGB) and `normalize` turns 8-bit [..., 3, H, W] pixels into the floats.
    """

    def __init__(self, cfg: PreprocessConfig) -> None:
        if not supports(cfg):
            raise ValueError(f"no PIL-only eval transform for {cfg}; use eval_transform")
        self.cfg = cfg
        self.size = cfg.height_width
        self.resample = _RESAMPLE[cfg.interpolation]
        self.mean = _channels(cfg.mean or OPENAI_MEAN)
        self.std = _channels(cfg.std or OPENAI_STD)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(self.to_image(image), dtype=np.uint8)
        pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return self.normalize(pixels)

    def to_image(self, image: Image.Image) -> Image.Image:
        """The resized, centre-cropped RGB image."""
        image = center_crop(self._resize(image), self.size)
        return image if image.mode == "RGB" else image.convert("RGB")

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float pixels from 8-bit ones, with `ToTensor` + `Normalize`'s operations in their order."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)

    def _resize(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        if self.cfg.resize_mode == "squash":
            return _resize_to(image, height, width, self.resample)
        if height == width:
            return _resize_shortest(image, height, self.resample)
        # open_clip resizes to a non-square size with timm's ResizeKeepRatio, always bicubic.
        return _resize_keep_ratio(image, height, width)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"


def supports(cfg: PreprocessConfig) -> bool:
    """Whether EvalTransform reproduces open_clip's eval transform for `cfg`."""
    return cfg.mode == "RGB" and cfg.resize_mode in SUPPORTED_RESIZE_MODES and cfg.interpolation in _RESAMPLE


def eval_transform(cfg: Any) -> Callable[[Image.Image], torch.Tensor]:
    """The eval preprocessing of `cfg`: EvalTransform, or open_clip's transform where it has no equal."""
    config = PreprocessConfig.of(cfg)
    if supports(config):
        return EvalTransform(config)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**asdict(config)), is_train=False)  # type: ignore[no-any-return]


def _resize_to(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's resize of a PIL image to an exact size (a no-op when it already has it)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample)


def _resize_shortest(image: Image.Image, side: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's `Resize(side)`: the shorter edge to `side`, the longer one scaled and truncated."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(side * long / short)
    new_width, new_height = (side, new_long) if width <= height else (new_long, side)
    return _resize_to(image, new_height, new_width, resample)


def _resize_keep_ratio(image: Image.Image, height: int, width: int) -> Image.Image:
    """open_clip's `ResizeKeepRatio((height, width))` at eval: the ratio that fits the shorter side."""
    ratio = min(image.height / height, image.width / width)
    return _resize_to(
        image, round(image.height / ratio), round(image.width / ratio), Image.Resampling.BICUBIC
    )


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's `CenterCrop(size)` of a PIL image: zero padding where it is smaller, then the crop."""
    crop_height, crop_width = size
    if image.size == (crop_width, crop_height):
        return image  # a crop of the whole image would only copy it
    if crop_width > image.width or crop_height > image.height:
        image = _pad_to(image, crop_height, crop_width)
        if image.size == (crop_width, crop_height):
            return image
    top = int(round((image.height - crop_height) / 2.0))
    left = int(round((image.width - crop_width) / 2.0))
    return image.crop((left, top, left + crop_width, top + crop_height))


def _pad_to(image: Image.Image, height: int, width: int) -> Image.Image:
    """Zero borders that bring an image up to at least (height, width), split as torchvision does."""
    grow_w, grow_h = max(width - image.width, 0), max(height - image.height, 0)
    border = (grow_w // 2, grow_h // 2, (grow_w + 1) // 2, (grow_h + 1) // 2)
    bands = len(image.getbands())
    fill: int | tuple[int, ...] = 0 if bands == 1 else (0,) * bands
    palette = image.getpalette() if image.mode == "P" else None
    padded = ImageOps.expand(image, border=border, fill=fill)
    if palette is not None:
        padded.putpalette(palette)
    return padded
