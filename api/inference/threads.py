"""How many intra-op threads a CPU forward gets, chosen per model and batch size by timing real forwards.

No single count is right: on the 2-core development machine a one-image forward of the tiny
CLIP took 3.1 ms on one thread and 3.6 ms on two, while a batch of 8 took 14.9 ms on one and
8.3 ms on two (the bare classifier timed in a loop); and while the event loop is busy, a thread
that has to share its core can make a forward slower than fewer threads would. So each
(model, batch size) bucket times every candidate a few times, then keeps the fastest and
re-times the others now and then, since the load changes.

The load also changes from outside: another worker process of the service on the same cores.
A one-image ViT-B-32 forward timed while the other worker was busy made one thread look best,
and the bucket kept one thread (and a forward 1.4x slower) once it was alone, until its 64th
forward, a minute later. So a candidate's timing goes stale after `STALE_S`: a stale candidate
is re-timed after `REVISIT_MIN` forwards instead of `REVISIT_EVERY`, and its new timing replaces
the old estimate instead of being averaged with it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

# Each candidate is timed this many times before the fastest is chosen.
TRIALS = 3
# After that, every this many forwards of a bucket one other candidate is timed again.
REVISIT_EVERY = 64
# A stale candidate (not timed for STALE_S seconds) is re-timed once this many forwards passed.
REVISIT_MIN = 8
STALE_S = 2.0
# Weight of the newest timing in a candidate's running average.
SMOOTHING = 0.3


def candidate_counts(cores: int | None = None) -> list[int]:
    """One thread, half the cores and all of them (torch's default is one per core)."""
    cores = cores or torch.get_num_threads() or os.cpu_count() or 1
    return sorted({1, max(1, cores // 2), cores})


def bucket(batch_size: int) -> int:
    """Batch sizes grouped by the next power of two: a 5 costs about what a 6 costs."""
    return 1 << max(0, batch_size - 1).bit_length()


@dataclass
class _Bucket:
    seconds: dict[int, float] = field(default_factory=dict)
    trials: dict[int, int] = field(default_factory=dict)
    # time.monotonic() of each candidate's latest timing.
    timed_at: dict[int, float] = field(default_factory=dict)
    forwards: int = 0
    # The bucket's forward count at its latest revisit.
    revisited_at: int = 0


class ThreadChooser:
    """Chooses and sets torch's intra-op thread count before each forward; `record` times it."""

    def __init__(
        self, candidates: Sequence[int] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.candidates = list(candidates or candidate_counts())
        self.clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}
        self._lock = threading.Lock()

    def choose(self, key: tuple[Hashable, int]) -> int:
        """The count for a forward of `key` = (model, batch size); torch is set to it."""
        threads = self.pick(key)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def pick(self, key: tuple[Hashable, int]) -> int:
        """The count to use, without setting it."""
        with self._lock:
            entry = self._buckets.setdefault((key[0], bucket(key[1])), _Bucket())
            entry.forwards += 1
            untried = [n for n in self.candidates if entry.trials.get(n, 0) < TRIALS]
            if untried:
                return min(untried, key=lambda n: entry.trials.get(n, 0))
            best = min(self.candidates, key=lambda n: entry.seconds[n])
            others = [n for n in self.candidates if n != best]
            if not others:
                return best
            since = entry.forwards - entry.revisited_at
            stalest = min(others, key=lambda n: entry.timed_at[n])
            stale = self.clock() - entry.timed_at[stalest] >= STALE_S
            if since >= REVISIT_EVERY or (since >= REVISIT_MIN and stale):
                entry.revisited_at = entry.forwards
                return stalest
            return best

    def record(self, key: tuple[Hashable, int], threads: int, seconds: float) -> None:
        """Add one timing of a forward of `key` on `threads` threads."""
        with self._lock:
            entry = self._buckets.setdefault((key[0], bucket(key[1])), _Bucket())
            # Per image, so batch sizes within a bucket compare.
            per_image = seconds / max(1, key[1])
            count = entry.trials.get(threads, 0)
            old = entry.seconds.get(threads)
            now = self.clock()
            stale = now - entry.timed_at.get(threads, now) >= STALE_S
            entry.timed_at[threads] = now
            if old is None or (stale and count >= TRIALS):
                entry.seconds[threads] = per_image
            elif count < TRIALS:
                entry.seconds[threads] = min(old, per_image)  # the first trials: the best is the cost
            else:
                entry.seconds[threads] = (1 - SMOOTHING) * old + SMOOTHING * per_image
            entry.trials[threads] = count + 1

    def chosen(self, key: tuple[Hashable, int]) -> int | None:
        """The count a bucket settled on (None while it still times its candidates)."""
        with self._lock:
            entry = self._buckets.get((key[0], bucket(key[1])))
            if entry is None or any(entry.trials.get(n, 0) < TRIALS for n in self.candidates):
                return None
            return min(self.candidates, key=lambda n: entry.seconds[n])
