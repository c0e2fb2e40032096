"""The labelled eval set of a job: where its images are and which class each one is.

Two layouts (DESIGN.md section 3, `eval`):
- a folder per class: `<uri>/<class name>/<image>`, the folder name is the label;
- a manifest file, `<uri>` ending in `.csv` (rows `key,label`, an optional `key,label` header) or
  `.jsonl` (one `{"key": ..., "label": ...}` object a line); keys are relative to the manifest's
  folder and may not leave it.

Every label must be a class name of the job, and the set must not be empty: both are errors,
never a silent skip (the control API checks them at submit, the worker again before training).
Torch-free: the control API uses it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from services.errors import EvalSetError
from services.storage.base import ObjectStore
from services.storage.keys import join_key

MANIFEST_SUFFIXES = (".csv", ".jsonl")
# The same list as services.must.data.IMAGE_EXTENSIONS (which imports torch).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# A manifest of 100,000 images is a few MB; refuse what is far beyond that.
MAX_MANIFEST_BYTES = 64 << 20
# An eval set only reports accuracy: more images than this cost time and add little.
MAX_EVAL_IMAGES = 100_000


@dataclass(frozen=True, slots=True)
class EvalItem:
    """One labelled image: its key in the eval set's store and its class name."""

    key: str
    label: str


def is_manifest(uri: str) -> bool:
    """Whether `uri` names a manifest file rather than a folder per class."""
    return PurePosixPath(uri.rstrip("/")).suffix.lower() in MANIFEST_SUFFIXES


def _row_error(line: int, problem: str) -> EvalSetError:
    return EvalSetError(f"eval manifest line {line}: {problem}")


def _parse_csv(text: str) -> list[tuple[int, str, str]]:
    rows = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if len(cells) != 2 or not all(cells):
            raise _row_error(line, f"expected two non-empty fields `key,label`, got {row!r}")
        if line == 1 and [c.lower() for c in cells] == ["key", "label"]:
            continue
        rows.append((line, cells[0], cells[1]))
    return rows


def _parse_jsonl(text: str) -> list[tuple[int, str, str]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _row_error(line, f"not valid JSON ({exc.msg})") from None
        key = item.get("key") if isinstance(item, dict) else None
        label = item.get("label") if isinstance(item, dict) else None
        if not isinstance(key, str) or not isinstance(label, str) or not key.strip() or not label.strip():
            raise _row_error(line, 'expected an object with non-empty string "key" and "label"')
        rows.append((line, key.strip(), label.strip()))
    return rows


def _relative_key(key: str, line: int) -> str:
    """A manifest key inside the manifest's folder (no absolute path, URI or `..`)."""
    parts = PurePosixPath(key).parts
    if "://" in key or key.startswith("/") or ".." in parts:
        raise _row_error(line, f"key {key!r} must be relative to the manifest's folder, without `..`")
    return "/".join(part for part in parts if part != ".")


def parse_manifest(data: bytes, suffix: str, folder: str = "") -> list[EvalItem]:
    """The items of a `.csv` or `.jsonl` manifest, keys joined to the manifest's `folder`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"the eval manifest is not UTF-8 text: {exc}") from None
    parse = _parse_csv if suffix.lower() == ".csv" else _parse_jsonl
    return [EvalItem(join_key(folder, _relative_key(key, line)), label) for line, key, label in parse(text)]


def folder_items(keys: Iterable[str], prefix: str) -> list[EvalItem]:
    """Items of a folder-per-class layout from the keys under `prefix` (a folder, ending in `/`).

    Hidden files (`.DS_Store`) are ignored; any other file that is not an image in a class
    folder is an error, so a mislaid file is noticed rather than silently left out.
    """
    items, stray = [], []
    for key in keys:
        relative = PurePosixPath(key[len(prefix) :])
        if key.endswith("/") or relative.name.startswith("."):
            continue
        if len(relative.parts) != 2 or relative.suffix.lower() not in IMAGE_EXTENSIONS:
            stray.append(str(relative))
            continue
        items.append(EvalItem(key, relative.parts[0]))
    if stray:
        shown = ", ".join(repr(s) for s in stray[:5]) + (
            f" and {len(stray) - 5} more" if len(stray) > 5 else ""
        )
        raise EvalSetError(
            f"the eval set holds files that are not images in a class folder (<class>/<image>): {shown}"
        )
    return items


def check_items(items: Sequence[EvalItem], class_names: Sequence[str], where: str) -> None:
    """EvalSetError for an empty set, too many images, or labels that are not class names."""
    if not items:
        raise EvalSetError(f"the eval set at {where} holds no labelled images")
    if len(items) > MAX_EVAL_IMAGES:
        raise EvalSetError(f"the eval set at {where} has {len(items)} images; at most {MAX_EVAL_IMAGES}")
    unknown = sorted({item.label for item in items} - set(class_names))
    if unknown:
        shown = ", ".join(repr(label) for label in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise EvalSetError(
            f"the eval set at {where} has labels that are not class names: {shown}{more} "
            f"(class names: {', '.join(repr(n) for n in list(class_names)[:10])}"
            f"{', ...' if len(class_names) > 10 else ''})"
        )
    for item in items:
        if PurePosixPath(item.key).suffix.lower() not in IMAGE_EXTENSIONS:
            raise EvalSetError(f"eval set key {item.key!r} does not have an image file extension")


def _folder(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else f"{prefix}/"


def list_eval_items(store: ObjectStore, key: str, uri: str, class_names: Sequence[str]) -> list[EvalItem]:
    """The checked items of the eval set at `uri` (`key` is its key or prefix inside `store`).

    Reads the manifest, or lists the class folders (stopping past MAX_EVAL_IMAGES); raises
    EvalSetError when the set is unusable and the store's errors when it cannot be read.
    """
    if is_manifest(uri):
        if not key:  # a file:// manifest that is not a file (open_store took it for a folder)
            raise EvalSetError(f"the eval manifest {uri} does not exist")
        data = store.read_bytes(key, max_bytes=MAX_MANIFEST_BYTES)
        folder = str(PurePosixPath(key).parent) if "/" in key else ""
        items = parse_manifest(data, PurePosixPath(key).suffix, folder)
    else:
        prefix = _folder(key)
        listed = []
        for info in store.iter_keys(prefix):
            listed.append(info.key)
            if len(listed) > MAX_EVAL_IMAGES:
                break
        items = folder_items(listed, prefix)
    check_items(items, class_names, uri)
    return items
