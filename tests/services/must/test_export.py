"""Export and reload of the adapted classifier: same predictions, no pickle, integrity checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file

from bench.shapes import iter_domain
from services.must import vision
from services.must.adapt import prepare
from services.must.errors import CheckpointError
from services.must.export import MANIFEST, WEIGHTS, export_classifier, load_classifier
from services.must.preprocess import EvalTransform
from services.must.vision import VisionTower
from tests.services.must.test_trainer import CLASSES


@pytest.fixture
def exported(micro_clip, tmp_path: Path):
    prepared = prepare(micro_clip, CLASSES)
    with torch.no_grad():
        prepared.network.head.add_(0.01 * torch.randn_like(prepared.network.head))
    classifier = prepared.classifier()
    export_classifier(
        classifier,
        tmp_path,
        model_cfg=prepared.clip.model_cfg,
        templates=prepared.templates,
        source_model=prepared.source_model(),
        metrics={"note": "test"},
    )
    return classifier, tmp_path


def test_round_trip_gives_identical_predictions(exported) -> None:
    classifier, folder = exported
    images = [im for im, _ in iter_domain("target", 12, seed=9)]
    loaded = load_classifier(folder)
    torch.testing.assert_close(loaded.predict(images), classifier.predict(images), rtol=0, atol=1e-6)
    assert loaded.class_names == CLASSES
    assert loaded.predict(images).sum(1).allclose(torch.ones(12))


def test_the_loaded_tower_is_the_plain_one_and_gives_the_trained_towers_features(exported) -> None:
    classifier, folder = exported
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    loaded = load_classifier(folder)

    assert isinstance(loaded.visual, VisionTower)
    assert isinstance(loaded.transform, EvalTransform)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.visual(pixels), classifier.visual(pixels), rtol=0, atol=1e-5)


def test_a_loaded_classifier_exports_the_same_tensors_again(exported, tmp_path: Path) -> None:
    classifier, folder = exported
    loaded = load_classifier(folder)
    manifest = json.loads((folder / MANIFEST).read_text())

    export_classifier(
        loaded,
        tmp_path / "again",
        model_cfg=manifest["model_cfg"],
        templates=manifest["templates"],
        source_model=manifest["source_model"],
    )

    first, again = load_file(str(folder / WEIGHTS)), load_file(str(tmp_path / "again" / WEIGHTS))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads((tmp_path / "again" / MANIFEST).read_text())["preprocess"] == manifest["preprocess"]


def test_a_tower_the_plain_one_does_not_cover_is_built_by_open_clip(exported, monkeypatch) -> None:
    classifier, folder = exported
    monkeypatch.setattr(vision, "supports", lambda cfg: False)
    images = [im for im, _ in iter_domain("target", 4, seed=9)]

    loaded = load_classifier(folder)

    assert isinstance(loaded.visual, VisionTransformer)
    torch.testing.assert_close(loaded.predict(images), classifier.predict(images), rtol=0, atol=1e-6)


def test_manifest_describes_the_classifier(exported) -> None:
    _, folder = exported
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format"] == "must-classifier/1"
    assert manifest["model_cfg"]["vision_cfg"]["patch_size"] == 8
    assert manifest["preprocess"]["size"] == [32, 32]
    assert manifest["class_names"] == CLASSES
    assert len(manifest["templates"]) == 7
    assert len(manifest["weights_sha256"]) == 64
    assert manifest["metrics"] == {"note": "test"}
    # safetensors: an 8-byte little-endian header length, then a JSON header (never a pickle stream).
    raw = (folder / WEIGHTS).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "must-classifier/1"
    assert "head" in header


def test_tampered_weights_are_refused(exported) -> None:
    _, folder = exported
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_classifier(folder)


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="manifest"):
        load_classifier(tmp_path)


def test_created_at_is_iso_8601_utc_like_the_api_and_old_unix_times_are_converted(exported) -> None:
    from datetime import UTC, datetime

    from pydantic import TypeAdapter

    from services.must.export import read_manifest

    _, folder = exported
    written = json.loads((folder / MANIFEST).read_text())["created_at"]
    moment = datetime.fromisoformat(written)
    assert written.endswith("Z")
    assert moment.tzinfo is not None
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 600
    # The same text the API's pydantic models give a datetime.
    assert TypeAdapter(datetime).dump_python(moment, mode="json") == written

    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(manifest | {"created_at": 1764531000.5}))
    assert read_manifest(folder).created_at == "2025-11-30T19:30:00.500000Z"
