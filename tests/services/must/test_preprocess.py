"""The PIL-only eval preprocessing gives open_clip's eval transform's tensors, bit for bit."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from services.must.preprocess import EvalTransform, PreprocessConfig, eval_transform, preprocess_to_dict

CONFIGS: dict[str, dict[str, Any]] = {
    "shortest-bicubic-224": {"size": 224},
    "shortest-bilinear-224": {"size": 224, "interpolation": "bilinear"},
    "shortest-random-is-bicubic": {"size": 64, "interpolation": "random"},
    "shortest-non-square": {"size": (48, 64), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
    "squash-224": {"size": 224, "resize_mode": "squash"},
    "squash-non-square-bilinear": {"size": (40, 56), "resize_mode": "squash", "interpolation": "bilinear"},
    "tiny-32": {"size": (32, 32)},
}
# (width, height): square, landscape, portrait, extreme ratios, smaller and exactly the input size.
SIZES = [(256, 256), (320, 200), (200, 333), (1000, 37), (37, 500), (17, 23), (224, 224), (32, 32), (31, 64)]


def _image(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    """Random pixels in `mode` (noise is the hardest case for a resize to match)."""
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    return rgba if mode == "RGBA" else rgba.convert(mode)


def _open_clip_transform(cfg: dict[str, Any]) -> Any:
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_is_bit_identical_to_open_clips_eval_transform(name: str) -> None:
    cfg = CONFIGS[name]
    ours, reference = eval_transform(cfg), _open_clip_transform(cfg)
    assert isinstance(ours, EvalTransform)
    for i, size in enumerate(SIZES):
        for mode in ("RGB", "L", "RGBA", "P"):
            image = _image(size, mode, seed=i)
            expected = reference(image)
            got = ours(image)
            assert got.dtype == expected.dtype == torch.float32
            assert got.is_contiguous()
            assert torch.equal(got, expected), (name, size, mode)


def test_the_pil_part_and_the_batched_normalisation_give_the_same_tensors() -> None:
    transform = EvalTransform(PreprocessConfig(size=64))
    images = [_image(size, "RGB", seed=i) for i, size in enumerate(SIZES)]

    pixels = torch.stack(
        [torch.from_numpy(np.array(transform.to_image(im))).permute(2, 0, 1) for im in images]
    )

    assert pixels.dtype == torch.uint8
    assert torch.equal(transform.normalize(pixels), torch.stack([transform(im) for im in images]))


def test_other_resize_modes_use_open_clips_transform() -> None:
    cfg = {"size": 64, "resize_mode": "longest", "fill_color": 7}

    transform = eval_transform(cfg)

    assert not isinstance(transform, EvalTransform)
    image = _image((100, 40), "RGB", seed=3)
    assert torch.equal(transform(image), _open_clip_transform(cfg)(image))


def test_config_reads_open_clips_dataclass_and_a_manifest_dict_alike() -> None:
    cfg = PreprocessCfg(size=(32, 32), mean=(0.1, 0.2, 0.3), resize_mode="squash")

    from_dataclass = PreprocessConfig.of(cfg)
    from_manifest = PreprocessConfig.of(preprocess_to_dict(cfg) | {"unknown_key": 1})

    assert from_dataclass == from_manifest
    assert from_manifest.size == (32, 32)
    assert from_manifest.mean == (0.1, 0.2, 0.3)
    assert preprocess_to_dict(from_manifest) == preprocess_to_dict(cfg)


def test_defaults_are_open_clips() -> None:
    assert asdict(PreprocessConfig()) == asdict(PreprocessCfg())
    assert PreprocessConfig.of({"size": 224, "mean": None}) == PreprocessConfig()
