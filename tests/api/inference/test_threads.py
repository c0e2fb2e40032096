"""The intra-op thread chooser times each candidate, keeps the fastest and re-times the others."""

from __future__ import annotations

import torch

from api.inference.threads import (
    REVISIT_EVERY,
    REVISIT_MIN,
    STALE_S,
    TRIALS,
    ThreadChooser,
    bucket,
    candidate_counts,
)


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


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stale_timing_is_retaken_soon_and_replaces_the_estimate() -> None:
    clock = _Clock()
    chooser = ThreadChooser([1, 2], clock=clock)
    key = ("vit", 1)
    # Timed while another worker kept the other core busy: one thread looked best.
    _run(chooser, key, {1: 0.20, 2: 0.30}, 2 * TRIALS)
    assert chooser.chosen(key) == 1

    # Within STALE_S, only the usual revisits.
    picks = _run(chooser, key, {1: 0.20, 2: 0.13}, REVISIT_EVERY // 2)
    assert set(picks) == {1}

    # Seconds later, alone: two threads is re-timed within REVISIT_MIN forwards, and one fresh
    # timing is enough to switch (an average with 0.30 would not be below 0.20).
    clock.now += STALE_S
    picks = _run(chooser, key, {1: 0.20, 2: 0.13}, REVISIT_MIN + 4)

    assert 2 in picks[: REVISIT_MIN + 1]
    assert chooser.chosen(key) == 2
    assert picks[-3:] == [2, 2, 2]


def test_a_stale_bucket_is_not_revisited_on_every_forward() -> None:
    clock = _Clock()
    chooser = ThreadChooser([1, 2], clock=clock)
    key = ("vit", 8)
    _run(chooser, key, {1: 0.10, 2: 0.30}, 2 * TRIALS)

    picks = []
    for _ in range(4 * REVISIT_MIN):
        clock.now += STALE_S  # every timing of the other count is stale by the next forward
        picks += _run(chooser, key, {1: 0.10, 2: 0.30}, 1)

    # One forward in REVISIT_MIN at most goes to the slower count.
    assert picks.count(2) <= 4
    assert chooser.chosen(key) == 1


def test_choose_sets_torch() -> None:
    default = torch.get_num_threads()
    chooser = ThreadChooser([1])
    try:
        assert chooser.choose(("model", 1)) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(default)
