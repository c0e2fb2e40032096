"""VisionTower: open_clip's ViT image tower without open_clip, loaded from open_clip's state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from open_clip.model import _build_vision_tower

from services.must import vision
from services.must.vision import VisionTower, load_vision_tower

TINY_CONFIGS = sorted((Path(__file__).resolve().parents[3] / "bench" / "tiny_clip").glob("*.json"))
# Settings open_clip honours for the towers MUST adapts, beyond the tiny configs' defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "layer-scale-final-ln-no-ln-pre": {"ls_init_value": 0.1, "final_ln_after_pool": True, "no_ln_pre": True},
    "norm-eps": {"norm_kwargs": {"eps": 1e-6}},
}


def _open_clip_tower(cfg: dict[str, Any], quick_gelu: bool, seed: int = 0) -> torch.nn.Module:
    """open_clip's image tower of `cfg` with every parameter random (layer scales and norms too)."""
    torch.manual_seed(seed)
    tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for param in tower.parameters():
            param.normal_(0.0, 0.05).add_(0.02)
    return tower


def _assert_same_features(cfg: dict[str, Any], quick_gelu: bool, batch: int = 3) -> None:
    reference = _open_clip_tower(cfg, quick_gelu)
    tower = load_vision_tower({**cfg, "quick_gelu": quick_gelu}, reference.state_dict()).eval()
    side = cfg["vision_cfg"].get("image_size", 224)
    pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(tower(pixels), reference(pixels), rtol=0, atol=1e-5)
    with torch.no_grad():  # the plain (not fused) attention path, as in ONNX export and training
        torch.testing.assert_close(tower(pixels), reference(pixels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("config_path", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tower_matches_open_clip_on_the_tiny_configs(
    config_path: Path, variant: str, quick_gelu: bool
) -> None:
    cfg = json.loads(config_path.read_text())
    cfg["vision_cfg"].update(VARIANTS[variant])
    _assert_same_features(cfg, quick_gelu)


def test_tower_matches_open_clip_with_tanh_gelu() -> None:
    cfg = json.loads(TINY_CONFIGS[0].read_text())
    cfg["vision_cfg"]["act_kwargs"] = {"approximate": "tanh"}
    _assert_same_features(cfg, quick_gelu=False)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_tower_matches_open_clip_vit_b_32_at_random_weights(quick_gelu: bool) -> None:
    cfg = open_clip.get_model_config("ViT-B-32")
    assert vision.supports(cfg)
    _assert_same_features(cfg, quick_gelu, batch=2)


def test_loading_assigns_the_given_tensors_and_allocates_no_other_weights() -> None:
    cfg = json.loads(TINY_CONFIGS[0].read_text())
    state = _open_clip_tower(cfg, quick_gelu=False).state_dict()

    tower = load_vision_tower(cfg, state)

    assert set(tower.state_dict()) == set(state)
    for name, tensor in tower.state_dict().items():
        assert tensor.device.type == "cpu"
        assert tensor.data_ptr() == state[name].data_ptr(), name


def test_tensors_that_do_not_fit_the_config_are_refused() -> None:
    cfg = json.loads(TINY_CONFIGS[0].read_text())
    state = _open_clip_tower(cfg, quick_gelu=False).state_dict()
    wider = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "width": 64}}

    with pytest.raises(RuntimeError, match="size mismatch"):
        load_vision_tower(wider, state)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_vision_tower(cfg, {k: v for k, v in state.items() if k != "proj"})


@pytest.mark.parametrize(
    "setting",
    [
        {"attentional_pool": True},
        {"pool_type": "avg"},
        {"output_tokens": True},
        {"qk_norm": True},
        {"block_type": "custom"},
        {"timm_model_name": "vit_base_patch16_224"},
        {"layers": [3, 4, 6, 3]},
        {"pos_embed_type": "rope"},
        {"a_setting_from_a_newer_open_clip": 1},
    ],
)
def test_towers_it_does_not_reproduce_are_not_supported(setting: dict[str, Any]) -> None:
    cfg = json.loads(TINY_CONFIGS[0].read_text())
    cfg["vision_cfg"].update(setting)

    assert not vision.supports(cfg)
    with pytest.raises(ValueError, match="does not support"):
        VisionTower(cfg["embed_dim"], cfg["vision_cfg"])


def test_an_explicit_default_block_type_is_supported() -> None:
    cfg = json.loads(TINY_CONFIGS[0].read_text())
    cfg["vision_cfg"].update({"block_type": "default", "patch_dropout": 0.5, "attn_pooler_heads": 8})

    assert vision.supports(cfg)
