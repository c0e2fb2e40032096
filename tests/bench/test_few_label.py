"""The few-label study's pieces: nested labelled sets and the linear-probe baseline."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.few_label import labelled_images, linear_probe
from bench.suite import CASES


def test_labelled_sets_have_n_per_class_and_are_nested(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "shapes-4-low-contrast")

    one = labelled_images(case, 1, tmp_path / "one")
    four = labelled_images(case, 4, tmp_path / "four")

    assert sorted(one.labels) == [0, 1, 2, 3]
    assert torch.bincount(torch.tensor(four.labels)).tolist() == [4, 4, 4, 4]
    assert [p.read_bytes() for p in one.paths] == [p.read_bytes() for p in four.paths[:4]]


def test_linear_probe_separates_what_its_labels_separate() -> None:
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])

    head = linear_probe(features, labels, 2, scale=100.0)

    assert (features @ head).argmax(1).tolist() == [0, 0, 1, 1]
    assert (torch.tensor([[0.8, 0.2], [0.3, 0.7]]) @ head).argmax(1).tolist() == [0, 1]
