"""Each process loads only its side of the boundaries: the API no torch, the engine no infrastructure."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded_after_import(module: str, candidates: list[str]) -> list[str]:
    """Which of `candidates` are in sys.modules after a fresh interpreter imports `module`."""
    code = f"import sys\nimport {module}\nprint(','.join(m for m in {candidates!r} if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [name for name in result.stdout.strip().split(",") if name]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("api.control.main", ["torch", "open_clip", "timm", "services.must"]),
        ("worker.celery_app", ["torch", "open_clip", "services.must", "worker.tasks", "fastapi"]),
        (
            "services.must.adapt",
            ["fastapi", "sqlalchemy", "boto3", "celery", "pydantic_settings", "api", "worker"],
        ),
        # Loading an exported classifier, and naming a model, need no open_clip (serving does both).
        ("services.must.export", ["open_clip", "timm", "torchvision", "huggingface_hub"]),
        ("services.must.loading", ["open_clip", "timm", "torchvision", "huggingface_hub"]),
    ],
)
def test_import_loads_nothing_across_the_boundary(module: str, forbidden: list[str]) -> None:
    assert _loaded_after_import(module, forbidden) == []
