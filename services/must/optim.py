"""AdamW with layer-wise learning-rate decay for an open_clip ViT, and a warm-up + cosine schedule."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import nn

_RESBLOCK = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.")
# The image tower's own embeddings only. MUST's new modules (mask token, ln_patch, decoder) and the
# head train at the full rate: the reference's name match put its mask token with the embeddings,
# at layer_decay ** (num_layers + 1) of the lr (0.4% for ViT-B), so it hardly left its random init.
_EMBEDDING = re.compile(r"(?:^|\.)(?:conv1|class_embedding|positional_embedding|ln_pre)(?:\.|$)")
# Embedding-like tensors: shrinking them towards 0 has no regularising meaning, so they are never decayed.
_ALWAYS_NO_DECAY = frozenset({"class_embedding", "positional_embedding", "mask_token"})


def layer_id_for(name: str, num_layers: int) -> int:
    """Depth of a ViT parameter: 0 for embeddings, i + 1 for resblock i, num_layers + 1 for the rest."""
    block = _RESBLOCK.search(name)
    if block is not None:
        return int(block.group(1)) + 1
    if _EMBEDDING.search(name):
        return 0
    return num_layers + 1


def _skips_weight_decay(name: str, param: nn.Parameter, no_weight_decay: AbstractSet[str]) -> bool:
    """Whether a parameter is exempt from weight decay (biases, norms, embeddings, named exclusions)."""
    if param.ndim <= 1 or name.rsplit(".", 1)[-1] in _ALWAYS_NO_DECAY:
        return True
    return any(name == entry or name.endswith("." + entry) for entry in no_weight_decay)


# timm's param_groups_layer_decay is not used: it derives layer ids from the model's timm
# `group_matcher`, which open_clip's VisionTransformer does not define.
def param_groups_layer_decay(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    no_weight_decay: AbstractSet[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Optimizer param groups with lr scaled by layer_decay ** (num_layers + 1 - layer_id)."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = layer_id_for(name, num_layers)
        decay = not _skips_weight_decay(name, param, no_weight_decay)
        if (layer_id, decay) not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id)
            groups[(layer_id, decay)] = {
                "params": [],
                "lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer_id,
                "name": f"layer_{layer_id}_{'decay' if decay else 'no_decay'}",
            }
        groups[(layer_id, decay)]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    betas: tuple[float, float] = (0.9, 0.999),
    no_weight_decay: AbstractSet[str] = frozenset(),
) -> torch.optim.AdamW:
    """AdamW over the layer-decayed param groups of `model`."""
    groups = param_groups_layer_decay(
        model,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        num_layers=num_layers,
        no_weight_decay=no_weight_decay,
    )
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over warmup_steps, then cosine down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: linear warm-up then cosine decay to min_ratio (resumable via state_dict)."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}"
        )
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    # A partial (not a lambda/closure) so LambdaLR.state_dict can record it and checkpoints pickle.
    multiplier = functools.partial(
        _warmup_cosine, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
