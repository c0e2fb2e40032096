"""A queued job whose message a Redis restart lost is sent again by the reconciler, once.

A private redis-server (no persistence) is the broker; messages are sent with the platform's
Celery app, and the restart is `SHUTDOWN NOSAVE` and a fresh start on the same port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from bench.loopback import RedisServer
from services.config import Settings
from services.db.models import Job
from services.db.types import utcnow
from services.jobs import repository
from tests.worker.conftest import create_job, tiny_request
from worker.broker import task_ids_in_broker
from worker.celery_app import GPU_QUEUE, make_celery
from worker.reconcile import broker_contents, resend_lost_messages, send_job


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis.log") as server:
        yield server


@pytest.fixture
def app(redis_server: RedisServer) -> Iterator[Celery]:
    celery = make_celery(Settings(broker={"url": redis_server.url}))
    yield celery
    celery.close()


def _age(session_factory: sessionmaker[Session], job_id: str, seconds: float) -> None:
    """Pretend the job's message was sent `seconds` ago."""
    with session_factory() as session:
        sent = utcnow() - timedelta(seconds=seconds)
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=sent))
        session.commit()


def test_a_message_lost_in_a_redis_restart_is_sent_again_once(
    session_factory: sessionmaker[Session], redis_server: RedisServer, app: Celery
) -> None:
    job_id = create_job(session_factory, tiny_request("s3://bucket/images/"))
    send_job(session_factory, app.send_task, job_id)
    with session_factory() as session:
        first_task = repository.get_job(session, job_id).celery_task_id
    in_broker = broker_contents(redis_server.url, delivered_within_s=60)
    _age(session_factory, job_id, 120)

    # Still in the broker: a job waiting for a free worker is left alone.
    assert first_task in (in_broker() or set())
    assert resend_lost_messages(session_factory, app.send_task, after_seconds=60, in_broker=in_broker) == []

    redis_server.restart()
    assert in_broker() == set()
    resent = resend_lost_messages(session_factory, app.send_task, after_seconds=60, in_broker=in_broker)
    # A second reconciler (another worker) in the same pass finds it claimed.
    again = resend_lost_messages(session_factory, app.send_task, after_seconds=60, in_broker=in_broker)

    assert resent == [job_id]
    assert again == []
    with session_factory() as session:
        job = repository.get_job(session, job_id)
    assert job.celery_task_id != first_task
    assert (in_broker() or set()) == {job.celery_task_id}


def test_young_queued_jobs_and_other_statuses_are_not_resent(
    session_factory: sessionmaker[Session], redis_server: RedisServer, app: Celery
) -> None:
    young = create_job(session_factory, tiny_request("s3://bucket/a/"))
    running = create_job(session_factory, tiny_request("s3://bucket/b/"))
    with session_factory() as session:
        repository.mark_running(session, running, owner="w", lease_seconds=60)
    _age(session_factory, running, 600)

    resent = resend_lost_messages(
        session_factory, app.send_task, after_seconds=60, in_broker=broker_contents(redis_server.url, 60)
    )

    assert resent == []
    assert young


def test_a_message_a_dead_worker_took_but_never_started_counts_as_lost(
    session_factory: sessionmaker[Session], redis_server: RedisServer, app: Celery
) -> None:
    job_id = create_job(session_factory, tiny_request("s3://bucket/images/"))
    send_job(session_factory, app.send_task, job_id)
    # A consumer takes the message without acknowledging it (as a worker does before running it).
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(GPU_QUEUE)
        message = queue.get(timeout=5)
        assert message is not None
        recent = task_ids_in_broker(redis_server.url, GPU_QUEUE, delivered_within_s=60)
        time.sleep(1.2)
        stale = task_ids_in_broker(redis_server.url, GPU_QUEUE, delivered_within_s=1)
        queue.close()

    with session_factory() as session:
        task_id = repository.get_job(session, job_id).celery_task_id
    assert recent == {task_id}
    assert stale == set()


def test_brokers_that_cannot_be_listed_resend_by_age_alone(session_factory: sessionmaker[Session]) -> None:
    sent: list[str] = []
    job_id = create_job(session_factory, tiny_request("s3://bucket/images/"))
    _age(session_factory, job_id, 120)

    resent = resend_lost_messages(
        session_factory,
        lambda name, **kwargs: sent.append(kwargs["kwargs"]["msg"]["job_id"]),
        after_seconds=60,
        in_broker=broker_contents("filesystem://", 60),
    )

    assert resent == sent == [job_id]
