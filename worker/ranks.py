"""One process of a multi-GPU job, started by torchrun from the worker (see `worker.launch`).

    python -m torch.distributed.run --standalone --nproc-per-node N -m worker.ranks <plan.json>

Every rank joins the process group, rebuilds the job's context from the plan the worker wrote
(settings, staged images, eval set) and trains its share of each global batch. Rank 0 also does
what a one-GPU job does in the worker's process: it renews the lease, writes progress and
heartbeats, checks for cancellation (all ranks stop at the step it decides), publishes the
checkpoints, exports the classifier and records how the job ended. A rank started again by
torchrun after the job already ended, or went to another worker, exits at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.config import Settings
from services.db.session import make_engine, make_session_factory
from services.jobs import repository
from services.jobs.states import JobStatus
from services.must import distributed
from services.must.data import SkipReport
from services.must.errors import Cancelled
from worker.dataset import LabelledImages, StagedImages
from worker.logs import collect_job_logs
from worker.pipeline import JobContext, guarded, job_context, run_rank
from worker.progress import keep_lease

log = logging.getLogger(__name__)


def _inputs(plan: dict[str, Any]) -> tuple[StagedImages, LabelledImages | None]:
    staged = plan["staged"]
    skipped = SkipReport(counts=dict(staged["counts"]), examples=dict(staged["examples"]))
    images = StagedImages([Path(p) for p in staged["paths"]], skipped, list(staged["keys"]))
    labelled = plan["eval"]
    if labelled is None:
        return images, None
    return images, LabelledImages([Path(p) for p in labelled["paths"]], list(labelled["labels"]))


def _context(plan: dict[str, Any], rank: distributed.World) -> JobContext:
    settings = Settings(**plan["settings"])
    sessions = make_session_factory(make_engine(settings.database.url))
    device = distributed.rank_device()
    ctx = job_context(plan["job_id"], sessions, settings, device, plan["owner"], Path(plan["work_root"]))
    ctx.main = rank.is_main
    return ctx


def _still_ours(ctx: JobContext) -> bool:
    """False when the job ended (a restart after rank 0 recorded it) or another worker holds it."""
    with ctx.session_factory() as session:
        job = repository.get_job(session, ctx.job_id)
        return job.status == JobStatus.RUNNING and job.lease_owner == ctx.owner


def _follow(ctx: JobContext, staged: StagedImages) -> int:
    """A rank other than 0: train; its errors end the process, and torchrun then stops the others."""
    with contextlib.suppress(Cancelled):  # rank 0 decided it and records it
        run_rank(ctx, staged, None, threading.Event())
    return 0


def _lead(ctx: JobContext, staged: StagedImages, eval_set: LabelledImages | None) -> int:
    """Rank 0: the job's lease, logs and end, as `pipeline.run_training_job` keeps them for one GPU.

    Exits 1 when the job did not end well, so that torchrun stops ranks waiting on this one;
    an unexpected error is left for the worker to record (see `pipeline._after_ranks`).
    """
    worker = ctx.settings.worker
    lease = keep_lease(
        ctx.job_id,
        ctx.session_factory,
        owner=ctx.owner,
        heartbeat_seconds=worker.heartbeat_seconds,
        lease_seconds=worker.lease_seconds,
    )
    with collect_job_logs(ctx.job_id) as ctx.logs, lease as lost:
        try:
            # An unexpected error here is often another rank's death seen through a collective
            # (gloo: "connection reset by peer"): not the job's failure to record. The process
            # exits non-zero, torchrun restarts the ranks or gives up, and the worker decides.
            guarded(ctx, lost, lambda: run_rank(ctx, staged, eval_set, lost), record_unexpected=False)
        except Exception:
            log.exception("job %s: rank 0 stopped", ctx.job_id)
            raise
        finally:
            ctx.store_logs(final=True)
    with ctx.session_factory() as session:
        status = repository.get_job(session, ctx.job_id).status
    return 0 if lost.is_set() or status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m worker.ranks <plan.json> (started by torchrun)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = json.loads(Path(args[0]).read_text())
    rank = distributed.init_from_env()
    try:
        ctx = _context(plan, rank)
        if not _still_ours(ctx):
            log.info("job %s is not ours to run any more; rank %d exits", ctx.job_id, rank.rank)
            return 0
        staged, eval_set = _inputs(plan)
        return _lead(ctx, staged, eval_set) if rank.is_main else _follow(ctx, staged)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
