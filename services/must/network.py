"""The network MUST trains: a CLIP ViT image tower, the text-derived head and the MIM modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer


class MustNetwork(nn.Module):
    """Image tower + linear head, with a mask token, `ln_patch` and a pixel decoder for MIM.

    `forward` gives classification logits for unmasked images (teacher and inference);
    `encode` with a token mask gives the student's class and patch tokens.
    """

    def __init__(self, visual: VisionTransformer, head: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Parameter(head.clone())
        self.logit_scale = float(logit_scale)
        width = visual.conv1.out_channels
        self.patch = visual.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.ln_patch = nn.LayerNorm(width)
        self.decoder = nn.Sequential(
            nn.Conv2d(width, self.patch * self.patch * 3, kernel_size=1),
            nn.PixelShuffle(self.patch),
        )

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def num_classes(self) -> int:
        return self.head.shape[1]

    def encode(
        self, images: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class token after `ln_post` [B, width] and patch tokens after `ln_patch` [B, N, width].

        Masked patch embeddings are replaced by the mask token before the class token and the
        positional embeddings are added, as in MUST; open_clip's `_embeds` has no hook for that.
        """
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, N, width]
        if token_mask is not None:
            x = torch.where(token_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.transformer(v.ln_pre(x))
        return v.ln_post(x[:, 0]), self.ln_patch(x[:, 1:])

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image tower's projection into the joint embedding space."""
        proj = self.visual.proj
        return tokens if proj is None else tokens @ proj

    def classify(self, cls_token: torch.Tensor) -> torch.Tensor:
        """fp32 logits = scale * normalize(projected class token) @ head; the head is not renormalised.

        Autocast is off here: at a logit scale of 100, bf16 logits are a quarter of a unit apart,
        enough to move pseudo-labels and their confidence across the threshold.
        """
        with torch.autocast(cls_token.device.type, enabled=False):
            feats = F.normalize(self.project(cls_token.float()), dim=-1)
            return self.logit_scale * feats @ self.head.float()

    def decode(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] predicted from patch tokens [B, N, width]."""
        b, n, c = patch_tokens.shape
        gh, gw = self.grid
        return self.decoder(patch_tokens.transpose(1, 2).reshape(b, c, gh, gw))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cls_token, _ = self.encode(images)
        return self.classify(cls_token)
