"""The micro-batcher: one forward thread that runs the requests' images together, one batch at a time.

Requests reach it from the decoding threads, not from the event loop: a decoded request is put
on a thread-safe queue, the forward thread takes what is queued, runs one forward per model and
hands each request its rows straight back to its event loop. A request so costs the event loop
one hand-off to a decoding thread and one wake-up with its answer, however many threads it
passed through.

A batch waits only for requests that were already on their way when it started collecting
(`incoming`: counted by an `Arrival` from the route's entry until queued), and at most
`max_wait_s` or a tenth of the last forward's time, whichever is longer. A lone request goes at
once; under a steady load a batch never waits for requests that arrive after it began (which,
at 32 requests in flight, would hold every batch for the whole wait); and on a slow device the
requests that arrive together are not split into a small batch and a large one.

When nothing is queued, running or on its way, the request's own event loop may `claim` the
forward and run a small request start to end itself (`run_here`): at one request in flight the
two thread hand-offs and the wake-up back cost more than the tiny CLIP's whole forward
(bench.profile_inference). While a claim is held the forward thread waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from api.inference.threads import ThreadChooser

log = logging.getLogger(__name__)

Forward = Callable[[Any, torch.Tensor], torch.Tensor]
# What the forward thread does with a request's rows of probabilities before they go back.
Finish = Callable[[torch.Tensor], Any]


@dataclass
class Work:
    """One request's images for one model, and where its answer goes."""

    classifier: Any
    pixels: torch.Tensor
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    finish: Finish | None = None


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Runs on the request's event loop; a request whose client went away is skipped."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def answer(work: Work, value: Any = None, error: BaseException | None = None) -> None:
    """Hand a request its answer (or error) from any thread."""
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        work.loop.call_soon_threadsafe(_resolve, work.future, value, error)


class Arrival:
    """A request counted as on its way to the batcher, from route entry until it is queued or ends."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher: MicroBatcher | None = batcher
        batcher._count_incoming(1)

    def close(self) -> None:
        """Stop counting the request (idempotent, from any thread)."""
        batcher = self._batcher
        if batcher is not None:
            batcher._release(self)


class MicroBatcher:
    """Collects queued requests into batches of up to `max_batch` images, one forward per model."""

    # The longest wait for incoming requests, as a fraction of the last forward's duration.
    WAIT_FRACTION = 0.1

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        threads: ThreadChooser | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.threads = threads
        self._incoming = 0
        self._queue: deque[Work] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._last_forward_s = 0.0
        # Whether the forward thread runs a batch, or a caller holds a claim.
        self._running = False
        self._claimed = False
        # Seconds of each loaded model's latest one-image forward.
        self._single_s: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        # One long-lived thread: torch keeps one team of intra-op threads per calling thread.
        self._thread: threading.Thread | None = None

    @property
    def incoming(self) -> int:
        """Requests counted by an open `Arrival`."""
        return self._incoming

    def _count_incoming(self, delta: int) -> None:
        with self._ready:
            self._incoming += delta

    def _release(self, arrival: Arrival) -> None:
        """Stop counting `arrival` unless that was done already (called with the lock not held)."""
        with self._ready:
            if arrival._batcher is self:
                arrival._batcher = None
                self._incoming -= 1
                self._ready.notify()

    def put(self, work: Work, arrival: Arrival | None = None) -> None:
        """Queue a request (from any thread); it stops counting as incoming in the same step."""
        with self._ready:
            if self._closed:
                answer(work, error=RuntimeError("the inference service is shutting down"))
                return
            self._queue.append(work)
            if arrival is not None and arrival._batcher is self:
                arrival._batcher = None
                self._incoming -= 1
            self._start()
            self._ready.notify()

    async def submit(self, classifier: Any, pixels: torch.Tensor, arrival: Arrival | None = None) -> Any:
        """Class probabilities for `pixels`, computed in a batch with other pending requests."""
        loop = asyncio.get_running_loop()
        work = Work(classifier, pixels, loop, loop.create_future())
        self.put(work, arrival)
        return await work.future

    async def close(self) -> None:
        """Stop the forward thread once the batch it runs is done; queued requests get an error."""
        with self._ready:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._ready.notify_all()
        for work in pending:
            answer(work, error=RuntimeError("the inference service is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _start(self) -> None:
        """Start the forward thread on first use (called with the lock held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="forward", daemon=True)
            self._thread.start()

    def _collect(self) -> list[Work] | None:
        """The next batch (None once closed): what is queued, plus what was incoming at the start."""
        with self._ready:
            while (not self._queue or self._claimed) and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            self._running = True
            batch = [self._queue.popleft()]
            size = len(batch[0].pixels)
            expected = self._incoming
            deadline = time.monotonic() + max(self.max_wait_s, self.WAIT_FRACTION * self._last_forward_s)
            while size < self.max_batch:
                if self._queue:
                    work = self._queue.popleft()
                    batch.append(work)
                    size += len(work.pixels)
                    expected -= 1
                    continue
                remaining = deadline - time.monotonic()
                if expected <= 0 or self._incoming == 0 or remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            # Grouped by the loaded object, not the cache key: a reload may change a key's model mid-batch.
            groups: dict[int, list[Work]] = {}
            for work in batch:
                groups.setdefault(id(work.classifier), []).append(work)
            try:
                for items in groups.values():
                    self._execute(items)
            finally:
                with self._ready:
                    self._running = False
                    self._ready.notify_all()

    # ---- a request run by its own caller ---------------------------------------------------------

    def single_seconds(self, classifier: Any) -> float | None:
        """How long the model's latest one-image forward took (None before its first)."""
        return self._single_s.get(classifier)

    def claimable(self, arrival: Arrival | None = None) -> bool:
        """Whether `claim` would succeed now (a cheap look before work that only a claim needs)."""
        with self._ready:
            return self._free_for(arrival)

    def _free_for(self, arrival: Arrival | None) -> bool:
        """Nothing but `arrival` queued, running or on its way (called with the lock held)."""
        own = 1 if arrival is not None and arrival._batcher is self else 0
        busy = self._closed or self._claimed or self._running or bool(self._queue)
        return not busy and self._incoming <= own

    def claim(self, arrival: Arrival | None = None) -> bool:
        """Take the forward for the caller when no other request is queued, running or on its way.

        `arrival`, the caller's own request, stops counting as incoming. Every successful claim
        is ended by `unclaim`; meanwhile the forward thread waits.
        """
        with self._ready:
            if not self._free_for(arrival):
                return False
            if arrival is not None and arrival._batcher is self:
                arrival._batcher = None
                self._incoming -= 1
            self._claimed = True
            return True

    def unclaim(self) -> None:
        """End a claim; the forward thread takes what was queued meanwhile."""
        with self._ready:
            self._claimed = False
            self._ready.notify_all()

    def run_here(self, classifier: Any, pixels: torch.Tensor) -> torch.Tensor:
        """One forward in the calling thread, under a claim: timed and threaded like a batch."""
        return self._timed_forward(classifier, pixels)

    # ---- the forward thread ----------------------------------------------------------------------

    def _timed_forward(self, classifier: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The forward, on the thread count the chooser picks; its time is recorded."""
        chooser, key = self.threads, (id(classifier), len(pixels))
        threads = chooser.choose(key) if chooser is not None else None
        start = time.perf_counter()
        probs = self.forward(classifier, pixels)
        elapsed = time.perf_counter() - start
        self._last_forward_s = elapsed
        if len(pixels) == 1:
            self._single_s[classifier] = elapsed
        if chooser is not None and threads is not None:
            chooser.record(key, threads, elapsed)
        return probs

    def _execute(self, items: list[Work]) -> None:
        parts = [work.pixels for work in items]
        pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
        try:
            probs = self._timed_forward(items[0].classifier, pixels)
        except Exception as exc:  # every request of the batch gets the error; the thread goes on
            log.exception("a batched forward failed")
            for work in items:
                answer(work, error=exc)
            return
        offset = 0
        for work in items:
            rows = probs[offset : offset + len(work.pixels)]
            offset += len(work.pixels)
            try:
                value = work.finish(rows) if work.finish is not None else rows
            except Exception as exc:
                answer(work, error=exc)
                continue
            answer(work, value)
