"""A CLIP ViT image tower in plain PyTorch, to serve an exported classifier without open_clip.

`VisionTower` has the module tree and parameter names of open_clip's `VisionTransformer` (conv1,
class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, attn, ls_1, ln_2,
mlp.c_fc, mlp.c_proj, ls_2}, ln_post, proj), so an exported state dict loads unchanged, and its
forward takes the same operations in the same order. It covers the towers MUST adapts (see
`loading._check_vit`): class-token pooling, default attention blocks, layer scale, QuickGELU or
GELU, `no_ln_pre`, `final_ln_after_pool`, norm and activation keyword arguments. It is built for
inference: patch dropout and gradient checkpointing, which only act in training, are left out.
`supports` tells whether a model config is one of those; the others go to open_clip.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# vision_cfg keys VisionTower honours, with the value open_clip reads when a key is absent.
_DEFAULTS: dict[str, Any] = {
    "layers": 12,
    "width": 768,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "patch_size": 16,
    "image_size": 224,
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "act_kwargs": None,
    "norm_kwargs": None,
}
# Keys that only change the tower away from their default: any other value is not supported here.
_ONLY_DEFAULT: dict[str, Any] = {
    "attentional_pool": False,
    "pool_type": "tok",
    "output_tokens": False,
    "timm_model_name": None,
}
# Switches to open_clip's custom attention block, unless `block_type` is explicitly "default".
_CUSTOM_BLOCK_FLAGS = (
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)
# Read by open_clip only for attentional pooling or timm towers; harmless here.
_IGNORED = {"attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj"}
_IGNORED |= {"timm_proj_bias", "timm_drop", "timm_drop_path"}


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype, as open_clip's does under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The GELU approximation OpenAI's CLIPs were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (`gamma`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm self-attention and MLP, each on a residual branch with an optional layer scale."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float,
        layer_scale: bool,
        act: Callable[[], nn.Module],
        norm: Any,
    ) -> None:
        super().__init__()
        self.ln_1 = norm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width) if layer_scale else nn.Identity()
        self.ln_2 = norm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))]
            )
        )
        self.ls_2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_1(x)
        x = x + self.ls_1(self.attn(q, q, q, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """The stack of blocks, batch first."""

    def __init__(self, layers: int, **block: Any) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([Block(**block) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class VisionTower(nn.Module):
    """Patch embedding, class token, transformer, then the class token normalised and projected."""

    def __init__(self, embed_dim: int, vision_cfg: Mapping[str, Any], quick_gelu: bool = False) -> None:
        super().__init__()
        cfg = _config(vision_cfg)
        width = int(cfg["width"])
        self.image_size, self.patch_size = _pair(cfg["image_size"]), _pair(cfg["patch_size"])
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = embed_dim
        self.final_ln_after_pool = bool(cfg["final_ln_after_pool"])
        norm = _norm_layer(cfg["norm_kwargs"])
        self.conv1 = nn.Conv2d(3, width, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(
            torch.empty(self.grid_size[0] * self.grid_size[1] + 1, width)
        )
        self.ln_pre = nn.Identity() if cfg["no_ln_pre"] else norm(width)
        self.transformer = Transformer(
            int(cfg["layers"]),
            width=width,
            heads=width // int(cfg["head_width"]),
            mlp_ratio=float(cfg["mlp_ratio"]),
            layer_scale=cfg["ls_init_value"] is not None,
            act=_act_layer(quick_gelu, cfg["act_kwargs"]),
            norm=norm,
        )
        self.ln_post = norm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid cells, width]
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        pooled = self.ln_post(x[:, 0]) if self.final_ln_after_pool else self.ln_post(x)[:, 0]
        return pooled @ self.proj


def _config(vision_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config with open_clip's defaults filled in; ValueError for anything VisionTower lacks."""
    unsupported = unsupported_keys(vision_cfg)
    if unsupported:
        raise ValueError(f"VisionTower does not support these vision_cfg settings: {unsupported}")
    return {**_DEFAULTS, **{k: v for k, v in vision_cfg.items() if k in _DEFAULTS}}


def unsupported_keys(vision_cfg: Mapping[str, Any]) -> list[str]:
    """The vision_cfg settings VisionTower cannot reproduce (empty when it builds the tower)."""
    known = {*_DEFAULTS, *_ONLY_DEFAULT, *_CUSTOM_BLOCK_FLAGS, *_IGNORED, "block_type"}
    bad = [k for k in vision_cfg if k not in known]
    bad += [k for k, default in _ONLY_DEFAULT.items() if vision_cfg.get(k, default) != default]
    block_type = vision_cfg.get("block_type")
    if block_type not in (None, "default"):
        bad.append("block_type")
    if block_type is None:
        bad += [flag for flag in _CUSTOM_BLOCK_FLAGS if vision_cfg.get(flag)]
    if isinstance(vision_cfg.get("layers"), list | tuple):  # a ResNet tower
        bad.append("layers")
    if vision_cfg.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        bad.append("pos_embed_type")
    return sorted(set(bad))


def supports(model_cfg: Mapping[str, Any]) -> bool:
    """Whether VisionTower can stand in for open_clip's image tower of this model config."""
    return "embed_dim" in model_cfg and not unsupported_keys(model_cfg.get("vision_cfg", {}))


def _norm_layer(norm_kwargs: Mapping[str, Any] | None) -> Callable[[int], nn.Module]:
    kwargs = dict(norm_kwargs or {})
    return lambda width: LayerNorm(width, **kwargs)


def _act_layer(quick_gelu: bool, act_kwargs: Mapping[str, Any] | None) -> Callable[[], nn.Module]:
    kwargs = dict(act_kwargs or {})
    if quick_gelu:
        if kwargs:
            raise ValueError(f"QuickGELU takes no arguments, got act_kwargs {kwargs}")
        return QuickGELU
    return lambda: nn.GELU(**kwargs)


def load_vision_tower(model_cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> VisionTower:
    """The image tower of `model_cfg` holding `state_dict`'s tensors (an open_clip visual state dict).

    The tower is built on the meta device and handed the tensors as they are (`assign=True`): no
    randomly initialised copy is ever allocated, which would double the peak memory of a load.
    Raises RuntimeError when the tensors do not fit the config.
    """
    with torch.device("meta"):
        tower = VisionTower(
            int(model_cfg["embed_dim"]), model_cfg["vision_cfg"], quick_gelu=bool(model_cfg.get("quick_gelu"))
        )
    tower.load_state_dict(dict(state_dict), strict=True, assign=True)
    return tower
