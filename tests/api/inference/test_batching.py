"""The micro-batcher on its own: which requests share a forward."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from api.inference.batching import Arrival, MicroBatcher
from api.inference.main import default_max_batch
from api.inference.predictor import ServedModel
from bench.shapes import CLASS_NAMES
from bench.tiny_clip import TINY_CLIP_SPEC
from services.must.adapt import prepare


def _served() -> ServedModel:
    classifier = prepare(TINY_CLIP_SPEC, CLASS_NAMES).classifier()
    return ServedModel("tiny", classifier, {})


def _classifier() -> Any:
    """What the predictor hands the batcher: the loaded classifier."""
    return _served().classifier


def _batches(*, counted: bool, announced_after_s: float = 0.0) -> list[int]:
    """Forward sizes when a second request reaches the batcher 100 ms after the first.

    With `counted`, the second request is counted from its route's entry (an `Arrival`), as if
    it were still in its job lookup when the first one was queued; `announced_after_s` later
    than the first request's queueing.
    """
    served, sizes = _classifier(), []

    def forward(_: Any, pixels: torch.Tensor) -> torch.Tensor:
        sizes.append(len(pixels))
        return torch.zeros(len(pixels), len(CLASS_NAMES))

    async def scenario() -> None:
        # A wait budget far longer than the test's delay keeps it independent of the machine.
        batcher = MicroBatcher(forward, max_batch=32, max_wait_s=2.0)

        # Announced before the first request is queued, or some time after.
        early = Arrival(batcher) if counted and not announced_after_s else None

        async def late() -> torch.Tensor:
            await asyncio.sleep(announced_after_s)
            arrival = early or (Arrival(batcher) if counted else None)
            await asyncio.sleep(0.1 - announced_after_s)
            return await batcher.submit(served, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), arrival)

        try:
            await asyncio.gather(batcher.submit(served, torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), late())
            assert batcher.incoming == 0
        finally:
            await batcher.close()

    asyncio.run(scenario())
    return sizes


def test_a_request_counted_from_its_arrival_joins_the_pending_batch() -> None:
    assert _batches(counted=True) == [2]


def test_a_lone_request_does_not_wait_for_one_nobody_announced() -> None:
    assert _batches(counted=False) == [1, 1]


def test_a_batch_does_not_wait_for_requests_announced_after_it_began() -> None:
    # Under steady load requests are always on their way: waiting for those would hold every batch.
    assert _batches(counted=True, announced_after_s=0.05) == [1, 1]


def test_a_failed_forward_fails_its_requests_and_the_batcher_goes_on() -> None:
    served, calls = _classifier(), []

    def forward(_: Any, pixels: torch.Tensor) -> torch.Tensor:
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return torch.ones(len(pixels), 2)

    async def scenario() -> None:
        batcher = MicroBatcher(forward)
        try:
            pixels = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
            with pytest.raises(RuntimeError, match="device lost"):
                await batcher.submit(served, pixels)
            assert (await batcher.submit(served, pixels)).shape == (1, 2)
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert calls == [1, 1]


def test_an_arrival_is_released_once() -> None:
    batcher = MicroBatcher(lambda _, pixels: pixels)
    arrival = Arrival(batcher)
    assert batcher.incoming == 1
    arrival.close()
    arrival.close()
    assert batcher.incoming == 0


def test_batch_cap_by_device() -> None:
    assert default_max_batch("cpu") == 8
    assert default_max_batch("cuda:0") == 32


def test_cpu_service_batches_up_to_sixteen(client: TestClient) -> None:
    assert client.app.state.predictor.batcher.max_batch == 8  # type: ignore[attr-defined]


def test_a_claim_is_granted_only_while_nothing_else_is_queued_or_on_its_way() -> None:
    batcher = MicroBatcher(lambda _, pixels: pixels)
    own, other = Arrival(batcher), Arrival(batcher)
    assert not batcher.claimable(own)
    assert not batcher.claim(own)  # another request is on its way
    other.close()

    assert batcher.claim(own)
    assert batcher.incoming == 0  # the claimed request no longer counts as incoming
    assert not batcher.claim()  # one claim at a time
    batcher.unclaim()
    assert batcher.claim()
    batcher.unclaim()


def test_the_forward_thread_waits_for_a_claim_and_then_takes_what_was_queued() -> None:
    served, threads = _classifier(), []

    def forward(_: Any, pixels: torch.Tensor) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return torch.zeros(len(pixels), 2)

    async def scenario() -> None:
        batcher = MicroBatcher(forward)
        try:
            pixels = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
            assert batcher.claim()
            queued = asyncio.ensure_future(batcher.submit(served, pixels))
            await asyncio.sleep(0.2)
            assert not queued.done()  # held while the claim lasts
            assert batcher.run_here(served, pixels).shape == (1, 2)
            batcher.unclaim()
            assert (await queued).shape == (1, 2)
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert threads == [threading.current_thread().name, "forward"]


def test_one_image_forwards_are_timed_per_model() -> None:
    classifier = _classifier()
    batcher = MicroBatcher(lambda _, pixels: torch.zeros(len(pixels), 2))
    assert batcher.single_seconds(classifier) is None
    assert batcher.claim()
    batcher.run_here(classifier, torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    batcher.unclaim()
    seconds = batcher.single_seconds(classifier)
    assert seconds is not None
    assert 0 < seconds < 1
