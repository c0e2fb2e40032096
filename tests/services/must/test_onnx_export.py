"""ONNX export of the tiny CLIP's classifier: onnxruntime gives PyTorch's probabilities within 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.shapes import CLASS_NAMES, iter_domain
from bench.tiny_clip import TINY_CLIP_SPEC
from services.must.adapt import prepare
from services.must.export import export_classifier, read_manifest
from services.must.onnx_export import LOGITS, PROBABILITIES, export_onnx_from_dir

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP's zero-shot classifier, with its head nudged, exported the platform's way."""
    folder = tmp_path_factory.mktemp("classifier")
    prepared = prepare(TINY_CLIP_SPEC, CLASS_NAMES)
    classifier = prepared.classifier()
    with torch.no_grad():
        classifier.head.add_(0.01 * torch.randn_like(classifier.head))
    export_classifier(
        classifier,
        folder,
        model_cfg=prepared.clip.model_cfg,
        templates=prepared.templates,
        source_model=prepared.source_model(),
    )
    return folder


def test_onnxruntime_matches_pytorch_and_the_metadata_names_the_classes(
    exported: Path, tmp_path: Path
) -> None:
    from services.must.export import load_classifier

    path = export_onnx_from_dir(exported, tmp_path / "tiny.onnx")
    classifier = load_classifier(exported)
    images = [image for image, _ in iter_domain("target", 24, seed=11)]
    pixels = classifier.preprocess(images)
    expected = classifier.predict(pixels).numpy()

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, logits = session.run([PROBABILITIES, LOGITS], {"pixels": pixels.numpy()})
    meta = session.get_modelmeta().custom_metadata_map

    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-4)
    assert probabilities.shape == (24, len(CLASS_NAMES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES)
    assert json.loads(meta["preprocess"])["mean"] == list(classifier.preprocess_cfg.mean)
    assert meta["weights_sha256"] == read_manifest(exported).weights_sha256
    # The batch size is free: one image works too.
    (single,) = session.run([PROBABILITIES], {"pixels": pixels[:1].numpy()})
    np.testing.assert_allclose(single, expected[:1], rtol=0, atol=1e-4)
