"""Choosing the pseudo-label confidence threshold without labels.

Measured as training thresholds: the teacher's probabilities on its weak view, in training's
precision. The paper tunes tau per data set on labelled data (0.7 for ImageNet with ViT-B/16, 0.2-0.7
elsewhere), which our users cannot do. The teacher's confidence scale differs between models,
class counts and domains, so instead tau is read off the zero-shot teacher's own confidence
distribution on the unlabeled data, before training:

- "quantile": tau = the q-quantile of the max-probabilities (q = 0.5 by default, so the most
  confident half of the data feeds self-training at the start; more as the teacher sharpens);
- "per_class_quantile": the same within each predicted class (classes with fewer than
  `min_per_class` predictions use the global value), which keeps classes the zero-shot model
  is shy about from being starved of pseudo-labels;
- "fixed": the user's value.

tau never goes below 1/K (a uniform guess) nor above 0.99.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from services.must.config import MustConfig
from services.must.network import MustNetwork
from services.must.views import autocast_or_not


@torch.no_grad()
def teacher_confidence(
    network: MustNetwork,
    batches: Iterable[torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max probability, predicted class) of `network` for every image in `batches`.

    `dtype` is the autocast precision training runs the teacher in; the logits are fp32 anyway.
    """
    network.eval()
    device = torch.device(device)
    probs = []
    for x in batches:
        with autocast_or_not(device, dtype):
            probs.append(network(x.to(device)).float().softmax(-1).cpu())
    if not probs:  # a rank whose share of the sample is empty
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    conf, pred = torch.cat(probs).max(dim=1)
    return conf, pred


def choose_threshold(
    confidence: torch.Tensor,
    predictions: torch.Tensor,
    num_classes: int,
    cfg: MustConfig,
    min_per_class: int = 10,
) -> torch.Tensor:
    """A scalar tau, or a per-class [K] tensor for "per_class_quantile" (see module docstring)."""
    floor, ceiling = 1.0 / num_classes, 0.99
    if cfg.threshold_mode == "fixed":
        assert cfg.threshold is not None
        return torch.tensor(float(cfg.threshold))
    q = cfg.threshold_quantile
    global_tau = float(torch.quantile(confidence.float(), q).clamp(floor, ceiling))
    if cfg.threshold_mode == "quantile":
        return torch.tensor(global_tau)
    taus = torch.full((num_classes,), global_tau)
    for k in predictions.unique().tolist():
        of_k = confidence[predictions == k]
        if of_k.numel() >= min_per_class:
            taus[k] = float(torch.quantile(of_k.float(), q).clamp(floor, ceiling))
    return taus
