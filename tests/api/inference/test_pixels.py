"""The split preprocessing gives exactly the classifier's own pixels."""

from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image

from api.inference.pixels import normalize, pixel_steps, to_uint8
from bench.shapes import sample
from services.must.export import load_classifier
from services.must.inference import ImageClassifier
from services.must.preprocess import EvalTransform
from tests.api.inference.conftest import Export


def _images() -> list[Image.Image]:
    # Larger than the model's input and not square, so resize and centre crop both do something.
    images = [sample("target", i, seed=5, size=48)[0].resize((60, 48)) for i in range(4)]
    images.append(Image.new("L", (40, 40), color=90))
    return images


def test_uint8_pixels_normalised_in_a_batch_match_the_classifier_preprocessing(
    exports: tuple[Export, Export],
) -> None:
    classifier = load_classifier(exports[0].folder)
    images = _images()
    steps = pixel_steps(classifier)
    assert isinstance(classifier.transform, EvalTransform)
    assert steps is not None

    pixels = to_uint8(steps, images)

    assert pixels.dtype == torch.uint8
    assert pixels.is_contiguous()
    assert torch.equal(normalize(pixels, classifier), classifier.preprocess(images))


def test_open_clips_torchvision_transform_is_split_too(exports: tuple[Export, Export]) -> None:
    loaded = load_classifier(exports[0].folder)
    longest = replace(loaded.preprocess_cfg, resize_mode="longest")
    classifier = ImageClassifier(loaded.visual, loaded.head, loaded.logit_scale, loaded.class_names, longest)
    images = _images()
    steps = pixel_steps(classifier)
    assert not isinstance(classifier.transform, EvalTransform)
    assert steps is not None

    assert torch.equal(normalize(to_uint8(steps, images), classifier), classifier.preprocess(images))


def test_float_pixels_pass_through_normalize(exports: tuple[Export, Export]) -> None:
    classifier = load_classifier(exports[0].folder)
    pixels = torch.randn(2, 3, 32, 32)

    assert normalize(pixels, classifier) is pixels
