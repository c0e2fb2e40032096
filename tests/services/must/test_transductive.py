"""The instant method's arithmetic on hand-built features with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from services.must.errors import ConfigError
from services.must.transductive import (
    InstantConfig,
    class_statistics,
    distill_head,
    knn_graph,
    prototype_head,
    transduce,
)


def _circle(angles: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def test_knn_graph_finds_the_nearest_other_points_with_cosine_weights() -> None:
    z = _circle([0.0, 0.1, 1.5, 3.0])

    graph = knn_graph(z, k=1)

    assert graph.index.flatten().tolist() == [1, 0, 1, 2]
    assert graph.weight[0, 0].item() == pytest.approx(math.cos(0.1))
    assert graph.weight[3, 0].item() == pytest.approx(math.cos(1.5))


def test_knn_graph_chunks_give_the_same_graph() -> None:
    z = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)

    whole, chunked = knn_graph(z, k=4), knn_graph(z, k=4, block=7 * 50)

    assert torch.equal(whole.index, chunked.index)
    assert torch.allclose(whole.weight, chunked.weight)


def test_negative_similarities_carry_no_weight_and_spread_uses_both_directions() -> None:
    z = _circle([0.0, math.pi])  # opposite points: each is the other's only neighbour, at cosine -1
    assert knn_graph(z, k=1).weight.flatten().tolist() == [0.0, 0.0]

    graph = knn_graph(_circle([0.0, 0.0, math.pi / 2]), k=1)  # 0 <-> 1 at weight 1; 2 -> 0 at weight 0
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # Row 0 receives 1 * q1 (its edge) + 1 * q1 (the edge 1 -> 0); row 1 likewise 2 * q0.
    assert torch.allclose(graph.spread(q), torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 0.0]]), atol=1e-6)


def test_class_statistics_of_a_hard_labelling() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])

    stats = class_statistics(z, q, anchor_means=torch.zeros(2, 2), anchor=0.0)

    assert stats.means.tolist() == [[1.0, 0.0], [0.0, 2.0]]
    # Squared deviations per dimension: (0, 0), (0, 1), (0, 1) over 3 images; the floor keeps dim 0 > 0.
    assert stats.variance[1].item() == pytest.approx(2 / 3)
    assert stats.variance[0].item() == pytest.approx(1e-6)
    assert stats.log_prior.exp().tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-3)


def test_the_anchor_keeps_an_empty_class_at_its_zero_shot_mean() -> None:
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # nothing in class 1
    anchors = torch.tensor([[0.0, 1.0], [0.6, 0.8]])

    stats = class_statistics(z, q, anchors, anchor=10.0)

    assert stats.means[1].tolist() == pytest.approx([0.6, 0.8])
    assert stats.means[0].tolist() == pytest.approx([(1.8 + 0.0) / 12, (0.6 + 10.0) / 12])


def _two_clusters(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two clusters of unit vectors (angles 0 +- 8 and 47 +- 8 degrees), and a text head whose
    boundary (45 degrees) cuts the second cluster: zero-shot takes part of it for class 0."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    degrees = torch.where(labels == 0, 0.0, 47.0) + 16.0 * (torch.rand(n, generator=g) - 0.5)
    z = torch.stack([degrees.deg2rad().cos(), degrees.deg2rad().sin()], 1)
    return z, labels, torch.eye(2)


def test_transduce_follows_the_clusters_where_zero_shot_cuts_one() -> None:
    z, labels, text = _two_clusters()
    zero_shot = (20.0 * z @ text).softmax(1)
    zs_acc = (zero_shot.argmax(1) == labels).float().mean()
    assert 0.6 < zs_acc < 0.9  # the set-up: zero-shot is wrong on part of cluster 1

    q = transduce(z, zero_shot, InstantConfig())

    assert (q.argmax(1) == labels).float().mean() == 1.0
    assert torch.allclose(q.sum(1), torch.ones(len(z)))


def test_a_named_class_without_images_takes_none_and_costs_the_others_nothing() -> None:
    z, labels, text = _two_clusters()
    z3 = torch.cat([z, torch.zeros(len(z), 1)], 1)
    # A third class named by the user with no image: its text leans toward the data but is closest
    # to none of it, so its statistics start from a mean of images zero-shot gives it little of.
    absent = F.normalize(torch.tensor([[0.3], [0.3], [1.0]]), dim=0)
    head = torch.cat([torch.cat([text, torch.zeros(1, 2)]), absent], 1)
    zero_shot = (20.0 * z3 @ head).softmax(1)

    q = transduce(z3, zero_shot, InstantConfig())

    assert (q.argmax(1) == 2).sum() == 0
    assert (q.argmax(1) == labels).float().mean() == 1.0
    assert q[:, 2].max() < 1e-3


def test_every_iteration_is_reported() -> None:
    z, _, text = _two_clusters(20)
    seen: list[int] = []

    transduce(z, (z @ text).softmax(1), InstantConfig(iterations=4), on_iteration=seen.append)

    assert seen == [1, 2, 3, 4]


def test_distilled_head_reproduces_the_soft_labels_on_the_images() -> None:
    z, labels, text = _two_clusters()
    targets = F.one_hot(labels, 2).float()
    losses: list[float] = []

    head = distill_head(z, targets, text, 20.0, InstantConfig(), on_step=lambda _, loss: losses.append(loss))

    assert ((z @ head).argmax(1) == labels).all()
    assert ((z @ text).argmax(1) != labels).any()  # the text head alone did not
    assert len(losses) == InstantConfig().distill_steps
    assert losses[-1] < losses[0]


def test_config_refuses_unknown_names_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown instant settings: lr"):
        InstantConfig.from_dict({"lr": 1.0})
    with pytest.raises(ConfigError, match="iterations"):
        InstantConfig.from_dict({"iterations": 0})
    assert InstantConfig.from_dict({"anchor": 0.0}).anchor == 0.0


def test_spread_in_chunks_equals_the_whole() -> None:
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    q = torch.rand(40, 5, generator=g).softmax(1)
    graph = knn_graph(z, k=3)

    assert torch.allclose(graph.spread(q), graph.spread(q, block=3 * 5 * 7), atol=1e-6)


def test_one_label_per_class_corrects_a_text_head_that_is_wrong_on_a_whole_cluster() -> None:
    z, labels, _ = _two_clusters()
    wrong = F.normalize(torch.tensor([[1.0, -0.6], [0.0, 0.8]]), dim=0)  # calls every image class 0
    zero_shot = (20.0 * z @ wrong).softmax(1)
    assert (zero_shot.argmax(1) == labels).float().mean() == 0.5
    known = torch.full((len(z),), -1)
    known[:2] = labels[:2]  # image 0 is of class 0, image 1 of class 1
    anchored = (20.0 * z @ prototype_head(wrong, z[:2], labels[:2])).softmax(1)

    q = transduce(z, anchored, InstantConfig(), known=known)

    assert q[1].tolist() == [0.0, 1.0]
    assert (q.argmax(1) == labels).float().mean() == 1.0
    # The labels alone, with the wrong text head's probabilities, are not enough: the KL term wins.
    assert (transduce(z, zero_shot, InstantConfig(), known=known).argmax(1) == labels).float().mean() < 0.6


def test_prototype_head_mixes_text_and_class_means_and_needs_every_class() -> None:
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # columns: e0 (unnormalised) and e1
    features = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])

    head = prototype_head(text, features, labels)

    assert head[:, 0].tolist() == pytest.approx([2**-0.5, 0.0, 2**-0.5])
    mean1 = F.normalize(torch.tensor([0.0, 1.6, 0.8]), dim=0)
    assert head[:, 1].tolist() == pytest.approx(
        F.normalize(torch.tensor([0.0, 1.0, 0.0]) + mean1, dim=0).tolist()
    )
    with pytest.raises(ConfigError, match="an image of every class; none for class indices \\[1\\]"):
        prototype_head(text, features[:1], labels[:1])
