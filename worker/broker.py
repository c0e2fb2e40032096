"""Which task messages the broker holds right now, so a lost one can be told from a waiting one.

For Redis (the deployed broker) kombu keeps a queue's messages in one list per priority step
(`gpu`, `gpu\\x06\\x163`, ...) and the messages handed to a worker but not yet acknowledged in
the `unacked` hash, with their delivery times in the `unacked_index` sorted set.
https://docs.celeryq.dev/projects/kombu/en/stable/reference/kombu.transport.redis.html
A Redis restart without persistence empties all of them: the messages of queued jobs are lost.
Other brokers cannot be inspected this way; there every old enough queued job counts as lost
(a duplicate message is harmless: the database lease runs a job once, and a finished job is
skipped).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

log = logging.getLogger(__name__)


def _task_id(payload: Any) -> str | None:
    """The Celery task id in a kombu message payload (protocol 2 keeps it in the headers)."""
    if isinstance(payload, (bytes, str)):
        payload = json.loads(payload)
    if not isinstance(payload, dict):
        return None
    headers = payload.get("headers") or {}
    task_id = headers.get("id") or (payload.get("properties") or {}).get("correlation_id")
    return str(task_id) if task_id else None


def _lists(queue: str | Sequence[str]) -> list[str]:
    """The Redis lists holding the messages of these queues, one per priority step."""
    queues = [queue] if isinstance(queue, str) else list(queue)
    return [f"{q}{Channel.sep}{step}" if step else q for q in queues for step in PRIORITY_STEPS]


def task_ids_in_broker(
    broker_url: str, queue: str | Sequence[str], *, delivered_within_s: float
) -> set[str] | None:
    """Ids of the tasks waiting in `queue` (or any of several) or delivered less than
    `delivered_within_s` ago and not yet acknowledged; None when the broker is not Redis (its
    contents cannot be listed).

    A message delivered longer ago whose job is still queued was taken by a worker that never
    started it (it died first): it counts as lost.
    """
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        ids: set[str | None] = set()
        for name in _lists(queue):
            ids.update(_task_id(raw) for raw in client.lrange(name, 0, -1))
        recent = client.zrangebyscore(Channel.unacked_index_key, time.time() - delivered_within_s, "+inf")
        for tag in recent:
            raw = client.hget(Channel.unacked_key, tag)
            if raw is not None:
                ids.add(_task_id(json.loads(raw)[0]))
    finally:
        client.close()
    ids.discard(None)
    return {task_id for task_id in ids if task_id is not None}
