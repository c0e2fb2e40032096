"""The intra-op thread chooser times each candidate, keeps the fastest and re-times the others."""

from __future__ import annotations

import torch

from api.inference.threads import REVISIT_EVERY, TRIALS, ThreadChooser, bucket, candidate_counts


def test_candidates_and_buckets() -> None:
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [1, 2]
    assert candidate_counts(16) == [1, 8, 16]
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 32)] == [1, 2, 4, 4, 8, 8, 16, 32]


def _run(chooser: ThreadChooser, key: tuple[str, int], cost: dict[int, float], forwards: int) -> list[int]:
    picks = []
    for _ in range(forwards):
        threads = chooser.pick(key)
        picks.append(threads)
        chooser.record(key, threads, cost[threads] * key[1])
    return picks


def test_each_candidate_is_timed_then_the_fastest_is_kept() -> None:
    chooser = ThreadChooser([1, 2])
    cost = {1: 0.003, 2: 0.005}  # seconds per image: one thread wins, as for a small model

    picks = _run(chooser, ("model", 1), cost, 2 * TRIALS + 20)

    assert sorted(picks[: 2 * TRIALS]) == [1] * TRIALS + [2] * TRIALS
    assert set(picks[2 * TRIALS :]) == {1}
    assert chooser.chosen(("model", 1)) == 1


def test_buckets_and_models_choose_apart() -> None:
    chooser = ThreadChooser([1, 2])
    _run(chooser, ("small", 1), {1: 0.003, 2: 0.005}, 2 * TRIALS)
    _run(chooser, ("small", 8), {1: 0.002, 2: 0.001}, 2 * TRIALS)

    assert chooser.chosen(("small", 1)) == 1
    assert chooser.chosen(("small", 7)) == 2  # 7 and 8 share a bucket
    assert chooser.chosen(("other", 8)) is None


def test_a_change_of_load_is_noticed_by_the_revisits() -> None:
    chooser = ThreadChooser([1, 2])
    key = ("model", 4)
    _run(chooser, key, {1: 0.001, 2: 0.002}, 2 * TRIALS)
    assert chooser.chosen(key) == 1

    # Now one thread has become slow (its core is busy): the revisits of 2 find that out.
    picks = _run(chooser, key, {1: 0.010, 2: 0.002}, 8 * REVISIT_EVERY)

    assert chooser.chosen(key) == 2
    assert picks[-REVISIT_EVERY:].count(2) >= REVISIT_EVERY - 1


def test_choose_sets_torch() -> None:
    default = torch.get_num_threads()
    chooser = ThreadChooser([1])
    try:
        assert chooser.choose(("model", 1)) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(default)
