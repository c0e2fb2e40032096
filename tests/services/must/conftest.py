"""Shared fixtures for the MUST engine tests: a tiny random-weight CLIP ViT, built offline.

- `tiny_config_path`: path of the tiny open_clip config (32 px images, patch 4, width 128, 4 layers;
  text context 20) at bench/tiny_clip/tiny_clip_config.json.
- `tiny_config`: a fresh dict copy of that config (safe to mutate).
- `tiny_checkpoint`: a safetensors file with random weights for that config (torch.manual_seed(0)),
  written once per test session. It does not depend on bench/tiny_clip/tiny_clip.safetensors.
- `tiny_clip`: a fresh `LoadedClip` of that config and checkpoint (a new model per test, so a
  test may release its text tower or change its weights).
- `torch_single_thread`: runs a module's tests with one intra-op thread (restored afterwards);
  use it with `pytestmark = pytest.mark.usefixtures("torch_single_thread")`. On a busy CPU, torch's
  thread pool spins against other processes and tiny models get tens of times slower.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from services.must.loading import LoadedClip, ModelSpec, load_clip
from services.must.network import MustNetwork

TINY_CONFIG_PATH = Path(__file__).resolve().parents[3] / "bench" / "tiny_clip" / "tiny_clip_config.json"


def build_random_clip(config: dict[str, Any], seed: int = 0) -> open_clip.CLIP:
    """An open_clip CLIP of `config` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return open_clip.CLIP(**config).eval()


def save_state_dict(model: torch.nn.Module, path: Path) -> Path:
    """Save `model`'s state dict as safetensors (shared tensors are cloned, as safetensors requires)."""
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    """Path of the tiny CLIP's open_clip config JSON."""
    assert TINY_CONFIG_PATH.is_file(), TINY_CONFIG_PATH
    return TINY_CONFIG_PATH


@pytest.fixture
def tiny_config(tiny_config_path: Path) -> dict[str, Any]:
    """A fresh copy of the tiny CLIP's config as a dict."""
    return json.loads(tiny_config_path.read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight (seed 0) safetensors checkpoint of the tiny CLIP, shared by the session."""
    model = build_random_clip(json.loads(tiny_config_path.read_text()), seed=0)
    return save_state_dict(model, tmp_path_factory.mktemp("tiny_clip") / "tiny_random.safetensors")


@pytest.fixture
def tiny_clip(tiny_config_path: Path, tiny_checkpoint: Path) -> LoadedClip:
    """A freshly loaded tiny CLIP (random weights from `tiny_checkpoint`), fp32, eval mode, CPU."""
    return load_clip(ModelSpec(config=str(tiny_config_path), checkpoint=str(tiny_checkpoint)))


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """One torch intra-op thread for the module's tests; the previous setting is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


MICRO_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def micro_clip(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """A random-weight micro CLIP (patch 8, 16 tokens) saved as config + safetensors: fast training runs."""
    root = tmp_path_factory.mktemp("micro_clip")
    save_state_dict(build_random_clip(MICRO_CONFIG), root / "w.safetensors")
    (root / "config.json").write_text(json.dumps(MICRO_CONFIG))
    return ModelSpec(config=str(root / "config.json"), checkpoint=str(root / "w.safetensors"))


@pytest.fixture
def micro_network(micro_clip: ModelSpec) -> MustNetwork:
    """A MustNetwork on the micro CLIP's image tower with a seeded random 3-class head."""
    clip = load_clip(micro_clip)
    head = torch.nn.functional.normalize(
        torch.randn(MICRO_CONFIG["embed_dim"], 3, generator=torch.Generator().manual_seed(0)), dim=0
    )
    return MustNetwork(clip.visual, head, clip.logit_scale)
