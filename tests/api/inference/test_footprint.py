"""The serving process loads only what an adapted classifier needs, and can give back CUDA's pages.

Each check runs in a fresh interpreter: this test process has open_clip loaded already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from api.inference.memory import MappedRegion, read_mappings, releasable
from bench.shapes import CLASS_NAMES, png_bytes
from services.must.export import load_classifier
from tests.api.inference.conftest import Export, as_dict, by_label
from tests.api.inference.footprint_driver import HEAVY

ROOT = Path(__file__).resolve().parents[3]


def _python(*args: str) -> str:
    """stdout of a fresh interpreter run in the repository root."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _serve(root: Path, *flags: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(_python("-m", "tests.api.inference.footprint_driver", str(root), *flags))
    return out


@pytest.fixture(scope="module")
def served_dir(
    exports: tuple[Export, Export], images: list[Image.Image], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A folder with the first export as `classifier/` and four PNG images."""
    root = tmp_path_factory.mktemp("footprint")
    (root / "classifier").mkdir()
    for path in exports[0].folder.iterdir():
        (root / "classifier" / path.name).write_bytes(path.read_bytes())
    for i, image in enumerate(images[:4]):
        (root / f"img-{i}.png").write_bytes(png_bytes(image))
    return root


def _probabilities(answer: dict[str, Any]) -> list[dict[str, float]]:
    return [by_label(result["predictions"]) for result in answer["results"]]


def _expected(export: Export, images: list[Image.Image]) -> list[dict[str, float]]:
    return [as_dict(row) for row in load_classifier(export.folder).predict(images)]


def test_importing_the_inference_app_loads_no_heavy_library() -> None:
    code = f"import sys\nimport api.inference.main\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"

    assert _python("-c", code).strip() == ""


def test_an_adapted_classifier_is_served_without_open_clip_or_torchvision(
    served_dir: Path, exports: tuple[Export, Export], images: list[Image.Image]
) -> None:
    out = _serve(served_dir)

    assert out["heavy_after_import"] == []
    assert out["heavy_after_serving"] == []
    got, want = _probabilities(out["answer"]), _expected(exports[0], images[:4])
    assert len(got) == 4
    for got_row, want_row in zip(got, want, strict=True):
        assert set(got_row) == set(CLASS_NAMES)
        assert got_row == pytest.approx(want_row, abs=1e-5)


def test_releasing_cuda_library_pages_lowers_rss_and_serving_is_unchanged(
    served_dir: Path, exports: tuple[Export, Export], images: list[Image.Image]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: its libraries' pages are in use and are kept")

    out = _serve(served_dir, "--release-cuda-pages")

    if out["cuda_rss_kb_before"] == 0:
        pytest.skip("this torch build maps no CUDA libraries")
    assert out["released"] > 0
    assert out["cuda_rss_kb_after"] < out["cuda_rss_kb_before"]
    for got_row, want_row in zip(
        _probabilities(out["answer"]), _expected(exports[0], images[:4]), strict=True
    ):
        assert got_row == pytest.approx(want_row, abs=1e-5)


SMAPS = """\
7f0000000000-7f0000200000 r-xp 00000000 08:01 11 /venv/site-packages/nvidia/cu13/lib/libcublasLt.so.13
Rss:                1024 kB
Private_Clean:      1024 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000200000-7f0000201000 r--p 00200000 08:01 11 /venv/site-packages/nvidia/cu13/lib/libcublasLt.so.13
Rss:                   4 kB
Private_Dirty:         4 kB
Anonymous:             4 kB
7f0000201000-7f0000202000 rw-p 00201000 08:01 11 /venv/site-packages/nvidia/cu13/lib/libcublasLt.so.13
Rss:                   4 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r-xp 00000000 08:01 12 /venv/site-packages/torch/lib/libtorch_cuda.so
Rss:                 512 kB
Shared_Dirty:          4 kB
7f0000400000-7f0000500000 r-xp 00000000 08:01 13 /venv/site-packages/torch/lib/libtorch_cuda.so
Rss:                 256 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 r-xp 00000000 08:01 14 /venv/site-packages/torch/lib/libtorch_cpu.so
Rss:                 512 kB
7f0000600000-7f0000700000 rw-p 00000000 00:00 0
Rss:                 512 kB
7f0000700000-7f0000800000 r--p 00000000 08:01 11 /venv/site-packages/nvidia/cu13/lib/libnvrtc.so.13
Rss:                   0 kB
"""


def test_only_clean_read_only_resident_mappings_of_cuda_libraries_are_released() -> None:
    mappings = read_mappings(SMAPS)

    chosen = [m for m in mappings if releasable(m)]

    assert len(mappings) == 8
    assert mappings[0] == MappedRegion(
        0x7F0000000000, 0x7F0000200000, "r-xp", "/venv/site-packages/nvidia/cu13/lib/libcublasLt.so.13", 1024
    )
    assert [(m.start, m.path.rsplit("/", 1)[1]) for m in chosen] == [
        (0x7F0000000000, "libcublasLt.so.13"),  # clean text; not the relocated, writable or empty ones
        (0x7F0000400000, "libtorch_cuda.so"),  # not the one with a dirty page
    ]
