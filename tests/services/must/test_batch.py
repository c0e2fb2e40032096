"""classify_stream and `must-predict DIR`: one record per image in order, errors per image, abstain."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from bench.shapes import iter_domain, write_folder
from services.must.adapt import prepare
from services.must.batch import BatchOptions, classify_stream
from services.must.cli import predict_main
from services.must.data import ImageLoadError
from services.must.export import export_classifier, load_classifier
from services.must.inference import ImageClassifier
from tests.services.must.test_trainer import CLASSES


@pytest.fixture(scope="module")
def model_dir(micro_clip, tmp_path_factory: pytest.TempPathFactory) -> Path:
    prepared = prepare(micro_clip, CLASSES)
    out = tmp_path_factory.mktemp("classifier")
    export_classifier(
        prepared.classifier(),
        out,
        model_cfg=prepared.clip.model_cfg,
        templates=prepared.templates,
        source_model=prepared.source_model(),
    )
    return out


@pytest.fixture(scope="module")
def classifier(model_dir: Path) -> ImageClassifier:
    return load_classifier(model_dir)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_records_follow_input_order_with_errors_in_place(classifier: ImageClassifier) -> None:
    images = [im for im, _ in iter_domain("target", 7, seed=3)]
    items: list[tuple[str, bytes | ImageLoadError]] = [
        (f"img-{i}.png", _png(im)) for i, im in enumerate(images)
    ]
    items.insert(2, ("broken.png", b"not an image"))
    items.insert(5, ("gone.png", ImageLoadError("unreadable", "permission denied")))
    records = list(classify_stream(classifier, items, BatchOptions(top_k=2, batch_size=3)))

    assert [r["image"] for r in records] == [name for name, _ in items]
    assert records[2]["error"]["reason"] == "not_an_image"
    assert records[5]["error"] == {"reason": "unreadable", "message": "unreadable: permission denied"}
    expected = classifier.predict(images)
    good = [r for r in records if "error" not in r]
    for record, probs in zip(good, expected, strict=True):
        assert len(record["predictions"]) == 2
        assert record["label"] == CLASSES[int(probs.argmax())]
        assert record["predictions"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert record["abstained"] is False


def test_abstains_below_min_probability(classifier: ImageClassifier) -> None:
    images = [im for im, _ in iter_domain("target", 6, seed=4)]
    top = classifier.predict(images).max(1).values
    cut = float(top.median())
    items = [(str(i), _png(im)) for i, im in enumerate(images)]
    records = list(classify_stream(classifier, items, BatchOptions(min_probability=cut)))
    for record, p in zip(records, top.tolist(), strict=True):
        assert record["abstained"] is (p < cut)
        assert (record["label"] is None) is (p < cut)
        assert record["predictions"][0]["probability"] == pytest.approx(p, abs=1e-6)


def test_too_large_images_are_refused_per_image(classifier: ImageClassifier) -> None:
    (image, _), *_ = iter_domain("target", 1, seed=5)
    data = _png(image)
    records = list(classify_stream(classifier, [("a", data)], BatchOptions(max_bytes=len(data) - 1)))
    assert records[0]["error"]["reason"] == "too_large"


def test_must_predict_reads_folders_recursively(model_dir: Path, tmp_path: Path, capsys) -> None:
    written = write_folder("target", 5, seed=6, out=tmp_path / "photos")
    nested = tmp_path / "photos" / "more"
    nested.mkdir()
    (nested / "x.png").write_bytes(written[0][0].read_bytes())
    (tmp_path / "photos" / "notes.txt").write_text("not listed: no image extension")
    single = tmp_path / "single.png"
    single.write_bytes(written[1][0].read_bytes())

    code = predict_main(
        ["--model-dir", str(model_dir), "--top-k", "1", str(tmp_path / "photos"), str(single)]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [Path(line["image"]).name for line in lines]
    assert len(lines) == 7
    assert names[-1] == "single.png"
    assert "x.png" in names
    assert "notes.txt" not in names
    assert all(len(line["predictions"]) == 1 and line["label"] in CLASSES for line in lines)
    # the same image read twice gets the same answer
    by_name = {Path(line["image"]).name: line for line in lines}
    assert by_name["x.png"]["predictions"] == by_name[written[0][0].name]["predictions"]


def test_must_predict_refuses_empty_input_and_bad_options(model_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert predict_main(["--model-dir", str(model_dir), str(tmp_path / "empty")]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert predict_main(["--model-dir", str(model_dir), "--min-probability", "2", str(tmp_path)]) == 2
    assert "--min-probability" in capsys.readouterr().err


def test_missing_file_is_an_error_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert predict_main(["--model-dir", str(model_dir), str(tmp_path / "nope.png")]) == 1
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["error"]["reason"] == "unreadable"
    assert line["error"]["message"] == "unreadable: No such file or directory"
