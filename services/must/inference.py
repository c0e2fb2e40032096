"""ImageClassifier: an image tower plus a class head; what is exported, served and evaluated.

Loading and serving one needs neither open_clip nor torchvision: the tower is any module (open_clip's
VisionTransformer in training, `vision.VisionTower` when loaded from an export) and the
preprocessing is `preprocess.eval_transform`. Only `zero_shot`, which builds a head with a text
tower, uses open_clip.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from services.must.classifier import build_text_head, described_names, release_text_tower
from services.must.preprocess import PreprocessConfig, eval_transform

if TYPE_CHECKING:
    from services.must.loading import LoadedClip
    from services.must.network import MustNetwork


class ImageClassifier(nn.Module):
    """logits = scale * normalize(visual(x)) @ head; no text tower needed at inference.

    `preprocess` is a PreprocessConfig, open_clip's PreprocessCfg or a manifest's dict; it is kept
    as a PreprocessConfig.
    """

    def __init__(
        self,
        visual: nn.Module,
        head: torch.Tensor,
        logit_scale: float,
        class_names: Sequence[str],
        preprocess: Any,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head.detach().clone().float())
        self.logit_scale = float(logit_scale)
        self.class_names = list(class_names)
        self.preprocess_cfg = PreprocessConfig.of(preprocess)
        self.transform = eval_transform(self.preprocess_cfg)

    @classmethod
    def from_network(
        cls, network: MustNetwork, class_names: Sequence[str], preprocess: Any
    ) -> ImageClassifier:
        """The classifier part of a trained MustNetwork (the MIM modules are left behind)."""
        visual = copy.deepcopy(network.visual).eval()
        return cls(visual, network.head.detach(), network.logit_scale, class_names, preprocess)

    @classmethod
    def zero_shot(
        cls,
        clip: LoadedClip,
        class_names: Sequence[str],
        templates: Sequence[str],
        device: str | torch.device = "cpu",
        descriptions: Mapping[str, str] | None = None,
    ) -> ImageClassifier:
        """The zero-shot baseline: the CLIP's image tower and a head built from the prompts
        (a described class's prompts carry its description, see `described_names`)."""
        prompt_names = described_names(class_names, descriptions)
        head = build_text_head(clip.model, clip.tokenizer, prompt_names, templates, device=device)
        release_text_tower(clip.model)
        return cls(clip.visual, head, clip.logit_scale, class_names, clip.preprocess).eval()

    @property
    def device(self) -> torch.device:
        return self.head.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.logits(self.visual(pixels))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """fp32 logits from image-tower outputs, with autocast off (see MustNetwork.classify)."""
        with torch.autocast(features.device.type, enabled=False):
            return self.logit_scale * F.normalize(features.float(), dim=-1) @ self.head.float()

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A normalised batch [B, 3, H, W] from PIL images."""
        return torch.stack([self.transform(im.convert("RGB")) for im in images])

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Class probabilities [B, K] for PIL images or an already preprocessed batch."""
        self.eval()
        if len(images) == 0:
            return torch.empty(0, len(self.class_names))
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        out = [
            self(pixels[i : i + batch_size].to(self.device)).float().softmax(-1).cpu()
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(out)

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[dict[str, Any]]]:
        """[[{"label", "probability"}, ...], ...] for each row of `probs`."""
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [
                {"label": self.class_names[i], "probability": float(p)}
                for p, i in zip(row_p, row_i, strict=True)
            ]
            for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
