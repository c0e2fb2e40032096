"""Eval-set manifests and class folders: parsing, and the errors for unusable sets (torch-free)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.errors import EvalSetError
from services.evalset import EvalItem, check_items, folder_items, is_manifest, list_eval_items, parse_manifest
from services.storage.local import LocalObjectStore

CLASSES = ["cat", "dog", "bird"]


def test_csv_manifest_with_header_and_blank_lines() -> None:
    data = b"key,label\ncats/1.jpg,cat\n\n dogs/2.png , dog \n"
    assert parse_manifest(data, ".csv", "eval") == [
        EvalItem("eval/cats/1.jpg", "cat"),
        EvalItem("eval/dogs/2.png", "dog"),
    ]


def test_csv_manifest_without_header_and_quoted_commas() -> None:
    data = b'a.jpg,cat\n"b,c.jpg",dog\n'
    assert parse_manifest(data, ".csv") == [EvalItem("a.jpg", "cat"), EvalItem("b,c.jpg", "dog")]


def test_jsonl_manifest() -> None:
    data = b'{"key": "x/1.jpg", "label": "bird"}\n\n{"key": "./2.jpg", "label": "cat", "extra": 1}\n'
    assert parse_manifest(data, ".jsonl", "m") == [EvalItem("m/x/1.jpg", "bird"), EvalItem("m/2.jpg", "cat")]


@pytest.mark.parametrize(
    ("data", "suffix", "message"),
    [
        (b"a.jpg,cat,extra\n", ".csv", "line 1: expected two non-empty fields"),
        (b"a.jpg,cat\nb.jpg,\n", ".csv", "line 2: expected two non-empty fields"),
        (b"../secret.jpg,cat\n", ".csv", "line 1: key '../secret.jpg' must be relative"),
        (b"s3://other/x.jpg,cat\n", ".csv", "must be relative"),
        (
            b'{"key": "a.jpg"}\n',
            ".jsonl",
            'line 1: expected an object with non-empty string "key" and "label"',
        ),
        (b"not json\n", ".jsonl", "line 1: not valid JSON"),
        (b"\xff\xfe\x00", ".csv", "not UTF-8"),
    ],
)
def test_bad_manifests_name_the_line(data: bytes, suffix: str, message: str) -> None:
    with pytest.raises(EvalSetError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_manifest(data, suffix)


def test_folder_per_class_layout_labels_by_folder() -> None:
    keys = ["e/cat/1.jpg", "e/dog/2.PNG", "e/.DS_Store", "e/dog/.hidden"]
    assert folder_items(keys, "e/") == [EvalItem("e/cat/1.jpg", "cat"), EvalItem("e/dog/2.PNG", "dog")]


def test_stray_files_in_a_class_folder_layout_are_errors() -> None:
    with pytest.raises(EvalSetError, match="not images in a class folder.*'README.txt'.*'cat/sub/1.jpg'"):
        folder_items(["e/README.txt", "e/cat/sub/1.jpg", "e/cat/2.jpg"], "e/")


def test_unknown_labels_and_empty_sets_are_errors() -> None:
    items = [EvalItem("1.jpg", "cat"), EvalItem("2.jpg", "Dog"), EvalItem("3.jpg", "horse")]
    with pytest.raises(EvalSetError, match="labels that are not class names: 'Dog', 'horse'"):
        check_items(items, CLASSES, "s3://b/eval.csv")
    with pytest.raises(EvalSetError, match="holds no labelled images"):
        check_items([], CLASSES, "s3://b/eval/")
    with pytest.raises(EvalSetError, match="image file extension"):
        check_items([EvalItem("notes.txt", "cat")], CLASSES, "s3://b/eval.csv")


def test_is_manifest() -> None:
    assert is_manifest("s3://b/x/eval.CSV")
    assert is_manifest("file:///data/eval.jsonl")
    assert not is_manifest("s3://b/eval/")


def test_list_eval_items_reads_folders_and_manifests(tmp_path: Path) -> None:
    for key in ("eval/cat/1.jpg", "eval/dog/2.jpg", "other/3.jpg"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    (tmp_path / "other" / "eval.csv").write_text("3.jpg,bird\n")
    store = LocalObjectStore(tmp_path)

    folder = list_eval_items(store, "eval", "file:///x/eval", CLASSES)
    manifest = list_eval_items(store, "other/eval.csv", "file:///x/other/eval.csv", CLASSES)

    assert folder == [EvalItem("eval/cat/1.jpg", "cat"), EvalItem("eval/dog/2.jpg", "dog")]
    assert manifest == [EvalItem("other/3.jpg", "bird")]
    with pytest.raises(EvalSetError, match="no labelled images"):
        list_eval_items(store, "missing-folder", "file:///x/missing-folder", CLASSES)
