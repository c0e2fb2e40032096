from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from services.must.classifier import (
    DEFAULT_TEMPLATES,
    MAX_CLASSES,
    build_text_head,
    release_text_tower,
    validate_class_names,
    validate_templates,
)
from services.must.errors import ConfigError
from services.must.inference import ImageClassifier
from services.must.loading import LoadedClip
from services.must.network import MustNetwork

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSES = ["cat", "dog", "red car"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{}"]
NetworkAndClassifier = tuple[MustNetwork, ImageClassifier]


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _reference_head(clip: LoadedClip, classes: list[str], templates: list[str]) -> torch.Tensor:
    """CLIP's zero-shot head by hand: per class, mean of normalised prompt embeddings, renormalised."""
    columns = []
    for name in classes:
        tokens = clip.tokenizer([t.format(name) for t in templates])
        embeddings = clip.model.encode_text(tokens, normalize=True)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def _reference_logits(clip: LoadedClip, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return clip.logit_scale * F.normalize(clip.model.encode_image(images), dim=-1) @ head


# --- class names and templates ------------------------------------------------------------------


def test_class_names_are_stripped() -> None:
    assert validate_class_names([" cat", "dog  ", "\tred car\n"]) == ["cat", "dog", "red car"]


@pytest.mark.parametrize("names", [[], ["only one"]])
def test_fewer_than_two_class_names(names: list[str]) -> None:
    with pytest.raises(ConfigError, match="at least two"):
        validate_class_names(names)


def test_duplicate_class_names_are_named() -> None:
    with pytest.raises(ConfigError, match="unique") as info:
        validate_class_names(["cat", "dog", "zebra", "dog", " cat "])
    message = str(info.value)
    assert "repeated: cat, dog" in message
    assert "zebra" not in message


@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_class_name(blank: str) -> None:
    with pytest.raises(ConfigError, match="must not be empty"):
        validate_class_names(["cat", blank, "dog"])


def test_too_many_class_names() -> None:
    assert len(validate_class_names([f"c{i}" for i in range(MAX_CLASSES)])) == MAX_CLASSES
    with pytest.raises(ConfigError, match="at most 10000"):
        validate_class_names([f"c{i}" for i in range(MAX_CLASSES + 1)])


def test_default_templates() -> None:
    templates = validate_templates(None)
    assert templates == list(DEFAULT_TEMPLATES)
    assert len(templates) == 7
    assert all(t.count("{}") == 1 for t in templates)
    assert len(set(templates)) == 7
    assert templates is not validate_templates(None)  # callers may mutate their copy


def test_user_templates_are_kept() -> None:
    assert validate_templates(("a {} in the wild",)) == ["a {} in the wild"]


@pytest.mark.parametrize("bad", ["a photo of a cat", "{} and {}"])
def test_template_without_exactly_one_placeholder(bad: str) -> None:
    with pytest.raises(ConfigError, match="exactly one") as info:
        validate_templates(["a photo of a {}.", bad])
    assert bad in str(info.value)


def test_empty_template_list() -> None:
    with pytest.raises(ConfigError, match="must not be empty"):
        validate_templates([])


# --- the text head ------------------------------------------------------------------------------


def test_build_text_head_matches_hand_built_zero_shot_classifier(tiny_clip: LoadedClip) -> None:
    # Two classes per batch: three classes take two batches.
    head = build_text_head(tiny_clip.model, tiny_clip.tokenizer, CLASSES, TEMPLATES, classes_per_batch=2)
    reference = _reference_head(tiny_clip, CLASSES, TEMPLATES)

    assert head.shape == (128, len(CLASSES))
    assert head.dtype == torch.float32
    torch.testing.assert_close(head.norm(dim=0), torch.ones(len(CLASSES)))
    torch.testing.assert_close(head, reference, atol=1e-5, rtol=1e-5)
    images = _images()
    torch.testing.assert_close(
        _reference_logits(tiny_clip, head, images),
        _reference_logits(tiny_clip, reference, images),
        atol=1e-4,
        rtol=1e-5,
    )


def test_head_depends_on_templates(tiny_clip: LoadedClip) -> None:
    one = build_text_head(tiny_clip.model, tiny_clip.tokenizer, CLASSES, TEMPLATES[:1])
    ensemble = build_text_head(tiny_clip.model, tiny_clip.tokenizer, CLASSES, TEMPLATES)
    assert not torch.allclose(one, ensemble)


# --- ImageClassifier ------------------------------------------------------------------------------


def test_zero_shot_classifier_matches_clip_and_frees_the_text_tower(tiny_clip: LoadedClip) -> None:
    images = _images()
    expected_head = _reference_head(tiny_clip, CLASSES, TEMPLATES)
    expected = _reference_logits(tiny_clip, expected_head, images)
    visual = tiny_clip.visual

    classifier = ImageClassifier.zero_shot(tiny_clip, CLASSES, TEMPLATES)

    model = tiny_clip.model
    for name in ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection"):
        assert getattr(model, name) is None, name
    assert not any(n.startswith(("transformer.", "token_embedding.")) for n, _ in model.named_parameters())
    assert classifier.visual is visual
    assert classifier.logit_scale == pytest.approx(tiny_clip.logit_scale)
    assert classifier.class_names == CLASSES
    assert not classifier.training
    with torch.no_grad():
        logits = classifier(images)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)

    probs = classifier.predict(images, batch_size=3)  # two batches
    assert probs.shape == (4, len(CLASSES))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(probs, expected.softmax(-1), atol=1e-5, rtol=1e-4)


def test_release_text_tower_is_idempotent(tiny_clip: LoadedClip) -> None:
    release_text_tower(tiny_clip.model)
    release_text_tower(tiny_clip.model)
    assert tiny_clip.model.transformer is None
    with torch.no_grad():
        assert tiny_clip.model.encode_image(_images(1)).shape == (1, 128)


def test_predict_on_pil_images(tiny_clip: LoadedClip) -> None:
    classifier = ImageClassifier.zero_shot(tiny_clip, CLASSES, TEMPLATES)
    images = [
        Image.new("RGB", (50, 40), (200, 30, 30)),
        Image.new("L", (32, 32), 128),  # converted to RGB
    ]
    probs = classifier.predict(images)
    assert probs.shape == (2, len(CLASSES))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    with torch.no_grad():
        direct = classifier(classifier.preprocess(images)).softmax(-1)
    torch.testing.assert_close(probs, direct)


def test_top_k_ordering(tiny_clip: LoadedClip) -> None:
    classifier = ImageClassifier.zero_shot(tiny_clip, CLASSES, TEMPLATES)
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])

    top2 = classifier.top_k(probs, k=2)
    assert [[d["label"] for d in row] for row in top2] == [["dog", "red car"], ["cat", "red car"]]
    assert top2[0][0]["probability"] == pytest.approx(0.7)
    assert top2[1][1]["probability"] == pytest.approx(0.3)

    everything = classifier.top_k(probs, k=10)  # k larger than the number of classes
    assert [d["label"] for d in everything[0]] == ["dog", "red car", "cat"]


# --- MustNetwork --------------------------------------------------------------------------------


@pytest.fixture
def network_and_classifier(tiny_clip: LoadedClip) -> NetworkAndClassifier:
    head = build_text_head(tiny_clip.model, tiny_clip.tokenizer, CLASSES, TEMPLATES)
    torch.manual_seed(0)
    network = MustNetwork(tiny_clip.visual, head, tiny_clip.logit_scale).eval()
    classifier = ImageClassifier(tiny_clip.visual, head, tiny_clip.logit_scale, CLASSES, tiny_clip.preprocess)
    return network, classifier.eval()


@torch.no_grad()
def test_network_forward_matches_image_classifier(
    network_and_classifier: NetworkAndClassifier,
) -> None:
    network, classifier = network_and_classifier
    images = _images()
    torch.testing.assert_close(network(images), classifier(images), atol=1e-4, rtol=1e-5)
    assert network.num_classes == len(CLASSES)
    assert network.grid == (8, 8)
    assert network.num_layers == 4


@torch.no_grad()
def test_encode_with_empty_mask_equals_unmasked(
    network_and_classifier: NetworkAndClassifier,
) -> None:
    network, _ = network_and_classifier
    images = _images(2)
    cls_plain, patches_plain = network.encode(images)
    cls_masked, patches_masked = network.encode(images, torch.zeros(2, 64, dtype=torch.bool))
    assert cls_plain.shape == (2, 128)
    assert patches_plain.shape == (2, 64, 128)
    assert torch.equal(cls_plain, cls_masked)
    assert torch.equal(patches_plain, patches_masked)


@torch.no_grad()
def test_masked_patches_hide_their_pixels(
    network_and_classifier: NetworkAndClassifier,
) -> None:
    network, _ = network_and_classifier
    images = _images(2)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, [0, 9, 63]] = True  # patches (0, 0), (1, 1) and (7, 7) of the 8 x 8 grid
    changed = images.clone()
    changed[:, :, 0:4, 0:4] = 5.0  # only pixels under masked patches change
    changed[:, :, 4:8, 4:8] = -5.0
    changed[:, :, 28:32, 28:32] = 3.0

    cls_plain, patches_plain = network.encode(images)
    cls_masked, patches_masked = network.encode(images, mask)
    assert not torch.allclose(patches_masked[mask], patches_plain[mask], atol=1e-3)
    assert not torch.allclose(cls_masked, cls_plain, atol=1e-4)

    # The student cannot see what lies under its mask ...
    cls_changed, patches_changed = network.encode(changed, mask)
    torch.testing.assert_close(cls_changed, cls_masked)
    torch.testing.assert_close(patches_changed, patches_masked)
    # ... but the unmasked network does.
    assert not torch.allclose(network.encode(changed)[0], cls_plain, atol=1e-4)


@torch.no_grad()
def test_decode_predicts_full_resolution_pixels(
    network_and_classifier: NetworkAndClassifier,
) -> None:
    network, _ = network_and_classifier
    _, patches = network.encode(_images(3))
    pixels = network.decode(patches)
    assert pixels.shape == (3, 3, 32, 32)
    assert torch.isfinite(pixels).all()
