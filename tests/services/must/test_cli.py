"""must-adapt / must-predict: bad inputs get clear errors, bad files are skipped and counted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.shapes import write_folder
from services.must.cli import adapt_main, predict_main


def _args(spec, images: Path, out: Path, classes: str, *extra: str) -> list[str]:
    return [
        "--images",
        str(images),
        "--classes",
        classes,
        "--out",
        str(out),
        "--model-config",
        spec.config,
        "--checkpoint",
        spec.checkpoint,
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.parametrize(
    ("classes", "message"),
    [("circle", "at least two class names"), ("circle,square,circle", "repeated: circle"), ("a,,b", "empty")],
)
def test_bad_class_lists(micro_clip, tmp_path: Path, capsys, classes: str, message: str) -> None:
    write_folder("target", 4, seed=1, out=tmp_path / "imgs")
    assert adapt_main(_args(micro_clip, tmp_path / "imgs", tmp_path / "out", classes)) == 2
    assert message in capsys.readouterr().err


def test_empty_and_missing_folders(micro_clip, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert adapt_main(_args(micro_clip, tmp_path / "empty", tmp_path / "out", "a,b")) == 2
    assert "no readable images" in capsys.readouterr().err
    assert adapt_main(_args(micro_clip, tmp_path / "nowhere", tmp_path / "out", "a,b")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_only_bad_files_fail_with_counts(micro_clip, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "fake.jpg").write_text("not a jpeg")
    assert adapt_main(_args(micro_clip, folder, tmp_path / "out", "a,b")) == 2
    err = capsys.readouterr().err
    assert "no readable images" in err
    assert "not_an_image" in err


def test_bad_hyperparameters(micro_clip, tmp_path: Path, capsys) -> None:
    write_folder("target", 4, seed=1, out=tmp_path / "imgs")
    args = _args(micro_clip, tmp_path / "imgs", tmp_path / "out", "a,b", "--hparams", '{"mask_ratio": 2}')
    assert adapt_main(args) == 2
    assert "mask_ratio" in capsys.readouterr().err
    args = _args(micro_clip, tmp_path / "imgs", tmp_path / "out", "a,b", "--hparams", '{"colour": 1}')
    assert adapt_main(args) == 2
    assert "unknown hyperparameters: colour" in capsys.readouterr().err


def test_adapt_skips_corrupt_files_then_predict(micro_clip, tmp_path: Path, capsys) -> None:
    images = tmp_path / "imgs"
    written = write_folder("target", 12, seed=2, out=images)
    (images / "corrupt.png").write_bytes(written[0][0].read_bytes()[:40])
    (images / "readme.md").write_text("# not an image")
    out = tmp_path / "run"
    assert (
        adapt_main(_args(micro_clip, images, out, "circle,square", "--steps", "2", "--batch-size", "4")) == 0
    )
    printed = capsys.readouterr().out
    assert "on 12 images" in printed
    assert "2 skipped" in printed
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    shutil.copy(images / "readme.md", tmp_path / "readme.png")
    assert (
        predict_main(
            ["--model-dir", str(out / "classifier"), str(written[1][0]), str(tmp_path / "readme.png")]
        )
        == 1
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["predictions"][0]["label"] in {"circle", "square"}
    assert abs(sum(p["probability"] for p in lines[0]["predictions"]) - 1.0) < 1e-5
    assert "error" in lines[1]


def test_console_scripts_are_installed() -> None:
    bindir = Path(sys.executable).parent
    for script in ("must-adapt", "must-predict"):
        result = subprocess.run([str(bindir / script), "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0
        assert "usage" in result.stdout


def test_instant_method_writes_a_classifier_and_refuses_training_options(
    micro_clip, tmp_path: Path, capsys
) -> None:
    write_folder("target", 12, seed=3, out=tmp_path / "imgs")
    out = tmp_path / "run"

    assert adapt_main(_args(micro_clip, tmp_path / "imgs", out, "circle,square", "--method", "instant")) == 0

    printed = capsys.readouterr().out
    assert "instant fit on 12 images" in printed
    manifest = json.loads((out / "classifier" / "manifest.json").read_text())
    assert manifest["metrics"]["method"] == "instant"
    assert manifest["network"] in {"instant", "zero_shot"}
    assert len(list((out / "features").rglob("*.safetensors"))) == 1
    assert (out / "metrics.jsonl").read_text().splitlines()
    args = _args(micro_clip, tmp_path / "imgs", out, "circle,square", "--method", "instant", "--steps", "3")
    assert adapt_main(args) == 2
    assert "do not apply to --method instant" in capsys.readouterr().err
