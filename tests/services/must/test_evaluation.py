"""Eval-set scoring on hand-built examples, and class descriptions in the text head."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from services.must.classifier import described_names
from services.must.errors import ConfigError
from services.must.evaluation import confusion_matrix, score_classifier, scores
from services.must.inference import ImageClassifier
from services.must.loading import LoadedClip, ModelSpec, load_clip

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NAMES = ["cat", "dog", "bird"]


def test_confusion_matrix_rows_are_true_classes() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    assert confusion_matrix(preds, labels, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_scores_from_a_known_confusion_matrix() -> None:
    confusion = torch.tensor([[2, 1, 0], [0, 1, 1], [0, 0, 0]])
    result = scores(confusion, NAMES)
    assert result["top1"] == pytest.approx(100 * 3 / 5)
    # bird has no images: no recall rather than a NaN or a made-up 0.
    assert result["per_class_recall"] == pytest.approx({"cat": 2 / 3, "dog": 0.5})
    assert result["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]


class _ByRedness(torch.nn.Module):
    """A stand-in image tower: its 'feature' is the mean of each colour channel."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_score_classifier_on_image_files(tiny_clip: LoadedClip, tmp_path: Path) -> None:
    # Head columns point at red, green and blue: the classifier predicts an image's dominant colour.
    head = torch.eye(3)
    classifier = ImageClassifier(_ByRedness(), head, 10.0, ["red", "green", "blue"], tiny_clip.preprocess)  # type: ignore[arg-type]
    colours = [(255, 0, 0), (250, 10, 10), (0, 255, 0), (0, 0, 255)]
    paths = [_png(tmp_path / f"{i}.png", c) for i, c in enumerate(colours)]
    labels = [0, 1, 1, 2]  # the second image is labelled green but is red

    result = score_classifier(classifier, paths, labels)

    assert result["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert result["top1"] == pytest.approx(75.0)
    assert result["per_class_recall"] == pytest.approx({"red": 1.0, "green": 0.5, "blue": 1.0})


def test_described_names_fill_the_template_slot() -> None:
    names = described_names(NAMES, {"bird": " a small bird on a branch "})
    assert names == ["cat", "dog", "bird, a small bird on a branch"]
    with pytest.raises(ConfigError, match="horse"):
        described_names(NAMES, {"horse": "a horse"})


def test_a_description_changes_only_its_class_column(tiny_config_path: Path, tiny_checkpoint: Path) -> None:
    spec = ModelSpec(config=str(tiny_config_path), checkpoint=str(tiny_checkpoint))
    templates = ["a photo of a {}."]
    plain = ImageClassifier.zero_shot(load_clip(spec), NAMES, templates).head
    described = ImageClassifier.zero_shot(
        load_clip(spec), NAMES, templates, descriptions={"bird": "a small bird perched on a branch"}
    ).head

    assert torch.allclose(plain[:, :2], described[:, :2], atol=1e-6)
    assert not torch.allclose(plain[:, 2], described[:, 2], atol=1e-4)
    assert torch.linalg.vector_norm(described[:, 2]).item() == pytest.approx(1.0, abs=1e-5)
