"""The label-free guard: neighbourhood kappa, margins against zero-shot, the decision and its memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from services.must.guard import (
    ZERO_SHOT,
    CandidateScore,
    Guard,
    Outputs,
    SnapshotMemory,
    balance,
    decide,
    knn_gain,
    neighbours,
)
from services.must.network import MustNetwork


def _clusters(k: int, per: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit features in k tight clusters (one per class) and their true labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, 16, generator=gen), dim=1)
    labels = torch.arange(k).repeat_interleave(per)
    feats = centres[labels] + spread * torch.randn(len(labels), 16, generator=gen)
    return F.normalize(feats, dim=1), labels


def _onehot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(labels, k).float() * 0.9 + 0.1 / k


def test_neighbours_exclude_self_and_are_nearest() -> None:
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]), dim=1)
    graph = neighbours(feats, k=1)
    assert graph.squeeze(1).tolist() == [1, 0, 3, 2]


def test_knn_gain_known_values() -> None:
    graph = torch.tensor([[1], [0], [3], [2]])
    # Every neighbour shares the label, two balanced classes: observed 1, chance 0.5.
    assert knn_gain(torch.tensor([0, 0, 1, 1]), graph, 2) == pytest.approx(0.5)
    # Every neighbour disagrees: observed 0, chance 0.5.
    assert knn_gain(torch.tensor([0, 1, 0, 1]), graph, 2) == pytest.approx(-0.5)
    # One label for everything agrees with every neighbour but carries no information.
    assert knn_gain(torch.tensor([0, 0, 0, 0]), graph, 2) == 0.0
    # Four separated pairs: merging two of them into one label (shares 1/4, 1/4, 1/2) gains less.
    pairs = torch.tensor([[1], [0], [3], [2], [5], [4], [7], [6]])
    assert knn_gain(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), pairs, 4) == pytest.approx(0.75)
    assert knn_gain(torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]), pairs, 4) == pytest.approx(0.625)


def test_balance() -> None:
    assert balance(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(1.0)
    assert balance(torch.tensor([0, 0, 0, 0]), 4) == pytest.approx(0.0)
    assert balance(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx(math.log(2) / math.log(4))


def test_a_labelling_that_follows_both_spaces_beats_zero_shot() -> None:
    """Zero-shot merges two classes in a space that separates them; the candidate splits them."""
    k = 4
    feats, truth = _clusters(k, 50, spread=0.05)
    zs_labels = truth.clone()
    zs_labels[zs_labels == 3] = 2  # zero-shot calls class 3 "2"
    guard = Guard(Outputs(feats, _onehot(zs_labels, k)))
    good = guard.score("teacher", Outputs(feats, _onehot(truth, k)), step=10)
    assert good.margin == pytest.approx(0.125, abs=0.01)  # 0.75 - 0.625 in both spaces
    # A noisy labelling (a third of labels random) is worse than zero-shot's clean merge.
    gen = torch.Generator().manual_seed(1)
    noisy = truth.clone()
    flip = torch.rand(len(noisy), generator=gen) < 0.35
    noisy[flip] = torch.randint(0, k, (int(flip.sum()),), generator=gen)
    bad = guard.score("student", Outputs(feats, _onehot(noisy, k)), step=10)
    assert bad.margin < 0
    assert guard.zero_shot_score().margin == 0.0
    assert good.agreement_with_zero_shot == pytest.approx(0.75)


def test_margin_cancels_the_home_advantage() -> None:
    """Identical labelling in an identical space is exactly as good as zero-shot."""
    feats, truth = _clusters(3, 30, spread=0.2)
    outputs = Outputs(feats, _onehot(truth, 3))
    assert Guard(outputs).score("teacher", outputs, 5).margin == pytest.approx(0.0)


def _score(name: str, margin: float, step: int = 100) -> CandidateScore:
    return CandidateScore(name, step, margin, 0.5, 0.5, 0.5, 1.0)


def test_decide_serves_the_best_candidate_above_the_margin() -> None:
    scores = [_score(ZERO_SHOT, 0.0, 0), _score("teacher", 0.03), _score("student", 0.05)]
    decision = decide(scores, min_margin=0.0)
    assert decision.served == "student"
    assert "student" in decision.reason
    assert decide(scores, min_margin=0.06).served == ZERO_SHOT


def test_decide_serves_zero_shot_when_nothing_beats_it_and_says_so() -> None:
    decision = decide([_score(ZERO_SHOT, 0.0, 0), _score("teacher", -0.02)], min_margin=0.0)
    assert decision.served == ZERO_SHOT
    assert "no adapted classifier beat zero-shot" in decision.reason
    assert "teacher" in decision.reason
    body = decision.to_dict()
    assert [c["name"] for c in body["candidates"]] == [ZERO_SHOT, "teacher"]


def _network(micro: MustNetwork, fill: float) -> MustNetwork:
    import copy

    net = copy.deepcopy(micro)
    with torch.no_grad():
        for p in net.visual.parameters():
            p.fill_(fill)
    return net


def test_snapshot_memory_keeps_the_best_teacher_and_survives_a_state_dict(micro_network: MustNetwork) -> None:
    memory = SnapshotMemory(micro_network)
    assert memory.kept_step is None
    assert not memory.offer(0, _score("teacher@10", -0.01, 10), _network(micro_network, 0.1), 0.0)
    assert memory.kept_step is None
    assert memory.offer(1, _score("teacher@20", 0.02, 20), _network(micro_network, 0.2), 0.0)
    assert not memory.offer(2, _score("teacher@30", 0.01, 30), _network(micro_network, 0.3), 0.0)
    assert memory.kept_step == 20
    assert all(float(p.flatten()[0]) == pytest.approx(0.2) for p in memory.visual.parameters())
    assert [s.name for s in memory.scores()] == ["teacher@10", "teacher@20", "teacher@30"]
    assert [s.margin for s in memory.scores()] == pytest.approx([-0.01, 0.02, 0.01])

    restored = SnapshotMemory(micro_network)
    restored.load_state_dict(memory.state_dict())
    assert restored.kept_step == 20
    assert [r["step"] for r in restored.rows()] == [10, 20, 30]
