"""The instant method's arithmetic: a transductive, label-free fit of class statistics on
frozen image features, then a linear head that serves the fitted labelling to unseen images.

Written from the published descriptions of TransCLIP (zero-shot variant, NeurIPS 2024) and
StatA (CVPR 2025), in this project's words; no code of theirs is used.

Given unit image features z_i, the text head T and the zero-shot probabilities p_i, it
alternates, for `iterations` rounds:

- class statistics from the current soft labels q: a mean per class, pulled toward the
  zero-shot class mean by `anchor` pseudo-images (so a class that few or no images take keeps
  statistics from the text's view of the data instead of collapsing or drifting: robust to
  absent classes), a diagonal variance shared by all classes, and class proportions pi_k
  learned from q (class-balance-aware: a class the data lack gets a small prior, instead of a
  fairness term forcing it a share of the images);
- soft labels from the three terms, for `inner` rounds each:

      log q_ik = text_weight * log p_ik + prior_weight * log pi_k + log N(z_i; mu_k, diag(v))
                 + smoothing * sum_j w_ij q_jk + const_i

  The first is the closed form of a KL term that keeps q close to zero-shot; the last
  smooths labels over the k-nearest-neighbour graph (w = positive cosine similarity, both
  directions of each edge).

The neighbour term exists only for the images seen, so the served classifier is a head
fitted to the final soft labels (`distill_head`): `scale * z @ W`, the format every
classifier of the platform has, started from the text head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from services.must.errors import ConfigError

# Similarities computed at a time (rows x N): about 1 GB of floats at any N.
KNN_BLOCK = 1 << 28
# Neighbour messages gathered at a time (rows x k x K): about 256 MB of floats.
SPREAD_BLOCK = 1 << 26
_VARIANCE_FLOOR = 1e-6


@dataclass(frozen=True)
class InstantConfig:
    """The instant method's few settings; see the module docstring for what each weighs."""

    neighbours: int = 3
    text_weight: float = 1.0
    smoothing: float = 1.0
    anchor: float = 10.0
    iterations: int = 10
    inner: int = 3
    distill_steps: int = 200
    distill_lr: float = 1e-3
    prior_weight: float = 1.0

    def validate(self) -> InstantConfig:
        checks = [
            (self.neighbours >= 0, "neighbours must be >= 0"),
            (
                min(self.text_weight, self.smoothing, self.anchor, self.prior_weight) >= 0,
                "instant weights must be >= 0",
            ),
            (self.iterations >= 1 and self.inner >= 1, "iterations and inner must be positive"),
            (self.distill_steps >= 0 and self.distill_lr > 0, "distill_steps >= 0 and distill_lr > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InstantConfig:
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown instant settings: {', '.join(unknown)}")
        return cls(**values).validate()


@dataclass
class Graph:
    """Each image's k nearest other images [N, k] and the edges' weights [N, k]."""

    index: torch.Tensor
    weight: torch.Tensor

    def spread(self, q: torch.Tensor, block: int = SPREAD_BLOCK) -> torch.Tensor:
        """sum_j w_ij q_j over both directions of every edge: [N, K], in chunks of rows
        (a whole [N, k, K] gather would be ~15 GB for ImageNet's 1.28M images and 1,000 classes)."""
        out = torch.zeros_like(q)
        n, k = self.index.shape
        if k == 0:
            return out
        rows = max(1, block // (k * q.shape[1]))
        for start in range(0, n, rows):
            index, weight = self.index[start : start + rows], self.weight[start : start + rows, :, None]
            out[start : start + rows] += (weight * q[index]).sum(1)
            back = (weight * q[start : start + rows, None, :]).reshape(-1, q.shape[1])
            out.index_add_(0, index.reshape(-1), back)
        return out


def knn_graph(features: torch.Tensor, k: int, block: int = KNN_BLOCK) -> Graph:
    """The k nearest neighbours by cosine similarity (unit features), in chunks of rows."""
    n = features.shape[0]
    chunk = max(1, block // max(1, n))
    k = min(k, n - 1)
    if k <= 0:
        empty = torch.empty(n, 0, device=features.device)
        return Graph(empty.long(), empty)
    index, weight = [], []
    for start in range(0, n, chunk):
        sims = features[start : start + chunk] @ features.T
        rows = torch.arange(sims.shape[0], device=features.device)
        sims[rows, rows + start] = -torch.inf
        top = sims.topk(k, dim=1)
        index.append(top.indices)
        weight.append(top.values.clamp_min(0.0))
    return Graph(torch.cat(index), torch.cat(weight))


@dataclass
class Statistics:
    """Class means [K, D], the shared diagonal variance [D] and log class proportions [K]."""

    means: torch.Tensor
    variance: torch.Tensor
    log_prior: torch.Tensor

    def log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z_i; mu_k, diag(v)) up to a per-image constant: [N, K], linear in z."""
        scaled = self.means / self.variance
        quad = (self.means * scaled).sum(1)
        return z @ scaled.T - 0.5 * quad


def class_statistics(
    z: torch.Tensor, q: torch.Tensor, anchor_means: torch.Tensor, anchor: float
) -> Statistics:
    """Statistics of the soft labelling q, each class mean pulled toward `anchor_means`."""
    n, k = q.shape
    counts = q.sum(0)
    sums = q.T @ z
    means = (sums + anchor * anchor_means) / (counts + anchor).clamp_min(1e-12).unsqueeze(1)
    # sum_ik q_ik (z_i - mu_k)^2 = sum_i z_i^2 - sum_k (2 mu_k s_k - n_k mu_k^2), per dimension.
    spread = (z * z).sum(0) - (2 * means * sums - counts.unsqueeze(1) * means * means).sum(0)
    variance = (spread / n).clamp_min(_VARIANCE_FLOOR)
    prior = (counts + 1e-3) / (n + 1e-3 * k)
    return Statistics(means, variance, prior.log())


def transduce(
    z: torch.Tensor,
    zero_shot: torch.Tensor,
    cfg: InstantConfig,
    on_iteration: Callable[[int], None] | None = None,
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft labels [N, K] of the images from their unit features and zero-shot probabilities.

    `known` [N] (few-label mode) holds the class of each labelled image and -1 elsewhere: those
    rows stay one-hot, so they anchor the class statistics and, through the graph, their neighbours.
    """
    log_zs = zero_shot.clamp_min(1e-12).log()
    graph = knn_graph(z, cfg.neighbours)
    rows = known >= 0 if known is not None else None
    q = _clamped(zero_shot.clone(), known, rows)
    anchor_means = (zero_shot.T @ z) / zero_shot.sum(0).clamp_min(1e-12).unsqueeze(1)
    for it in range(cfg.iterations):
        stats = class_statistics(z, q, anchor_means, cfg.anchor)
        fixed = cfg.text_weight * log_zs + stats.log_likelihood(z)
        fixed = fixed + cfg.prior_weight * stats.log_prior
        for _ in range(cfg.inner):
            q = _clamped((fixed + cfg.smoothing * graph.spread(q)).softmax(1), known, rows)
        if on_iteration is not None:
            on_iteration(it + 1)
    return q


def _clamped(q: torch.Tensor, known: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    """q with the labelled rows set to their one-hot labels."""
    if known is None or rows is None or not bool(rows.any()):
        return q
    q[rows] = F.one_hot(known[rows], q.shape[1]).to(q.dtype)
    return q


def prototype_head(text_head: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Few-label mode: each text column mixed half and half with its class's mean labelled image
    feature (both unit length, the sum renormalised). The image side carries what the labels show
    and the text side what they are too few to; every class needs at least one image."""
    k = text_head.shape[1]
    counts = torch.bincount(labels, minlength=k)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ConfigError(f"few-label mode needs an image of every class; none for class indices {missing}")
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    prototypes = F.normalize(sums, dim=1).T.to(text_head.dtype)
    return F.normalize(F.normalize(text_head, dim=0) + prototypes, dim=0)


def distill_head(
    z: torch.Tensor,
    targets: torch.Tensor,
    text_head: torch.Tensor,
    logit_scale: float,
    cfg: InstantConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """A head W [D, K], started from the text head, whose `scale * z @ W` fits the soft labels."""
    head = text_head.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([head], lr=cfg.distill_lr)
    for step in range(cfg.distill_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logit_scale * z @ head, targets)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, float(loss.detach()))
    return head.detach()
