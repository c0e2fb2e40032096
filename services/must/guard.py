"""The label-free guard: which classifier a job serves.

Candidates are the zero-shot classifier, the EMA teacher and the student at the end, and the
teacher at points along the way. Each is run on a sample of the job's own unlabeled images
(serving's preprocessing) and scored against zero-shot with the neighbourhood criterion below;
the job serves the best candidate, and zero-shot itself when none beats it by `min_margin`.

The criterion. A labelling of the images is judged by how well it agrees with the images'
neighbourhoods in feature space: the share of each image's k nearest neighbours that carry its
label, minus the share two random images would (the sum of squared label shares). That is the
Gini gain of a neighbourhood about the label: one label for everything gains nothing, and a
labelling that merges two separated clusters into one class gains less than one that keeps
them apart (Cohen's kappa, the same difference divided by 1 - chance, would score both 1). Scored in one
network's feature space alone, this favours that network's own labelling: zero-shot labels are a
linear cut of zero-shot features, and self-training pulls a student's features into clusters of
its own pseudo-labels. So each candidate is compared with zero-shot in both spaces, its own and
zero-shot's, where each side has the home advantage once:

    margin(c) = ( [gain(c | zs space) - gain(zs | zs space)]
                + [gain(c | c space)  - gain(zs | c space)] ) / 2

A labelling that follows the structure both networks see beats one that follows only its own.
How this was chosen over other label-free signals is in `bench/guard_study.py` and the README.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.must.network import MustNetwork
from services.must.views import autocast_or_not

GUARD_IMAGES = 2048
NEIGHBOURS = 10
# Fractions of the schedule at which the teacher is scored as a candidate.
GUARD_POINTS = (0.25, 0.5, 0.75)
ZERO_SHOT = "zero_shot"
_FIELDS = ("step", "margin", "gain_zs_space", "gain_own_space", "zero_shot_in_own_space", "balance")


@dataclass(frozen=True)
class Outputs:
    """A classifier's unit-norm image features [N, D] and probabilities [N, K] on the guard sample."""

    features: torch.Tensor
    probs: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        return self.probs.argmax(1)


@torch.no_grad()
def outputs_of(
    visual: nn.Module,
    head: torch.Tensor,
    logit_scale: float,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Outputs:
    """Run an image tower + head over `batches`; fp32 logits as in serving."""
    was_training = visual.training
    visual.eval()
    feats, probs = [], []
    try:
        for x in batches:
            with autocast_or_not(device, dtype):
                f = visual(x.to(device))
            f = F.normalize(f.float(), dim=-1)
            feats.append(f.cpu())
            probs.append((logit_scale * f @ head.float().to(f.device)).softmax(-1).cpu())
    finally:
        visual.train(was_training)
    return Outputs(torch.cat(feats), torch.cat(probs))


def neighbours(features: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Indices [N, k] of each row's k nearest other rows by cosine similarity."""
    n = features.shape[0]
    k = min(k, n - 1)
    sims = features @ features.T
    sims.fill_diagonal_(-math.inf)
    return sims.topk(k, dim=1).indices


def knn_gain(labels: torch.Tensor, graph: torch.Tensor, num_classes: int) -> float:
    """Share of neighbours sharing each image's label, minus the chance share (module docstring)."""
    if graph.numel() == 0:
        return 0.0
    observed = float((labels[graph] == labels[:, None]).float().mean())
    shares = torch.bincount(labels, minlength=num_classes).float() / len(labels)
    return observed - float((shares**2).sum())


def balance(labels: torch.Tensor, num_classes: int) -> float:
    """Entropy of the predicted-label shares over log K (1: every class equally often)."""
    shares = torch.bincount(labels, minlength=num_classes).float() / max(1, len(labels))
    entropy = float(-(shares * shares.clamp_min(1e-12).log()).sum())
    return entropy / math.log(num_classes) if num_classes > 1 else 0.0


@dataclass
class CandidateScore:
    """One candidate's guard values; `margin` is the criterion (zero-shot has margin 0)."""

    name: str
    step: int
    margin: float
    gain_zs_space: float
    gain_own_space: float
    zero_shot_in_own_space: float
    balance: float
    agreement_with_zero_shot: float | None = None
    mean_confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Decision:
    """What a job serves, why, and every candidate's score."""

    served: str
    reason: str
    candidates: list[CandidateScore]

    def to_dict(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "reason": self.reason,
            "candidates": [c.to_dict() for c in self.candidates],
        }


class Guard:
    """Scores candidates against the zero-shot classifier's outputs on the same images."""

    def __init__(self, zero_shot: Outputs, k: int = NEIGHBOURS) -> None:
        self.zero_shot = zero_shot
        self.k = k
        self.num_classes = zero_shot.probs.shape[1]
        self.zs_graph = neighbours(zero_shot.features, k)
        self.zs_gain = knn_gain(zero_shot.labels, self.zs_graph, self.num_classes)

    def zero_shot_score(self) -> CandidateScore:
        labels = self.zero_shot.labels
        return CandidateScore(
            name=ZERO_SHOT,
            step=0,
            margin=0.0,
            gain_zs_space=self.zs_gain,
            gain_own_space=self.zs_gain,
            zero_shot_in_own_space=self.zs_gain,
            balance=balance(labels, self.num_classes),
            agreement_with_zero_shot=1.0,
            mean_confidence=float(self.zero_shot.probs.max(1).values.mean()),
        )

    def score(self, name: str, outputs: Outputs, step: int) -> CandidateScore:
        """The candidate's margin over zero-shot, scored in both feature spaces (module docstring)."""
        labels, zs_labels, k = outputs.labels, self.zero_shot.labels, self.num_classes
        own_graph = neighbours(outputs.features, self.k)
        in_zs = knn_gain(labels, self.zs_graph, k)
        in_own = knn_gain(labels, own_graph, k)
        zs_in_own = knn_gain(zs_labels, own_graph, k)
        margin = 0.5 * ((in_zs - self.zs_gain) + (in_own - zs_in_own))
        return CandidateScore(
            name=name,
            step=step,
            margin=margin,
            gain_zs_space=in_zs,
            gain_own_space=in_own,
            zero_shot_in_own_space=zs_in_own,
            balance=balance(labels, k),
            agreement_with_zero_shot=float((labels == zs_labels).float().mean()),
            mean_confidence=float(outputs.probs.max(1).values.mean()),
        )


def decide(scores: list[CandidateScore], min_margin: float) -> Decision:
    """Serve the highest-margin candidate if it beats zero-shot by more than `min_margin`."""
    adapted = [s for s in scores if s.name != ZERO_SHOT]
    best = max(adapted, key=lambda s: s.margin, default=None)
    if best is not None and best.margin > min_margin:
        reason = f"{best.name} beats zero-shot by the guard's criterion (margin {best.margin:+.4f})"
        return Decision(best.name, reason, scores)
    detail = f"best was {best.name} at {best.margin:+.4f}" if best is not None else "no adapted candidate"
    return Decision(
        ZERO_SHOT,
        f"no adapted classifier beat zero-shot by the guard's criterion (margin > {min_margin}; {detail})",
        scores,
    )


class SnapshotMemory(nn.Module):
    """The best teacher snapshot seen at the guard points so far, and every point's scores.

    Registered on the MustTask, so it travels in checkpoints and a resumed job keeps the
    snapshots it scored before the interruption. It starts as a copy of the zero-shot network
    and is replaced only by a snapshot whose margin beats `min_margin` and every earlier one.
    """

    def __init__(self, network: MustNetwork, points: int = len(GUARD_POINTS)) -> None:
        super().__init__()
        self.visual = copy.deepcopy(network.visual).requires_grad_(False).eval()
        self.register_buffer("head", network.head.detach().clone())
        # One row per guard point: the _FIELDS values, then 1.0 on the row whose weights are kept.
        self.register_buffer("history", torch.full((points, len(_FIELDS) + 1), math.nan))

    def rows(self) -> list[dict[str, Any]]:
        """The scored points so far, each with its fields and whether its weights are the ones kept."""
        out = []
        for row in self.history.tolist():
            if not math.isnan(row[0]):
                out.append({**dict(zip(_FIELDS, row[:-1], strict=True)), "kept": row[-1] == 1.0})
        return out

    def scores(self) -> list[CandidateScore]:
        """The scored points as candidates named `teacher@<step>`."""
        out = []
        for row in self.rows():
            values = {f: row[f] for f in _FIELDS}
            step = int(values.pop("step"))
            out.append(CandidateScore(name=f"teacher@{step}", step=step, **values))
        return out

    @property
    def kept_step(self) -> int | None:
        """The step of the snapshot held, or None while it still holds the zero-shot network."""
        kept = [row for row in self.rows() if row["kept"]]
        return int(kept[0]["step"]) if kept else None

    def offer(self, index: int, score: CandidateScore, teacher: MustNetwork, min_margin: float) -> bool:
        """Record point `index`'s score; keep the teacher's weights if it is the best so far."""
        best = max([r["margin"] for r in self.rows() if r["kept"]], default=min_margin)
        keep = score.margin > max(best, min_margin)
        with torch.no_grad():
            if keep:
                self.history[:, -1] = torch.where(self.history[:, -1].isnan(), math.nan, 0.0)
                self.visual.load_state_dict(teacher.visual.state_dict())
                self.head.copy_(teacher.head.detach())
            values = [float(getattr(score, f)) for f in _FIELDS] + [1.0 if keep else 0.0]
            self.history[index] = torch.tensor(values)
        return keep
