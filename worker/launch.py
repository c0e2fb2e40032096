"""Starting a multi-GPU job's processes with torchrun and waiting for them.

The worker's own process keeps the job's lease, stages the images and then runs
`python -m torch.distributed.run --standalone --nproc-per-node N -m worker.ranks <plan>`: one
process per GPU (`worker.ranks`), which train the job with DDP and whose rank 0 writes its
progress, checkpoints and final state as a one-GPU job does. When one of them dies, torchrun
stops the others and exits; the worker may then start a new torchrun (`worker.rank_restarts`),
whose ranks resume from the job's last local checkpoint. A fresh torchrun each time, rather
than torchrun's own `--max-restarts`: on this torch version, gloo ranks restarted in place
could hang in their process group's setup.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How often the waiting worker looks at its lease while the ranks run.
POLL_SECONDS = 1.0
# After SIGTERM, how long torchrun gets to stop its processes before SIGKILL.
STOP_GRACE_SECONDS = 30.0


def count_gpus() -> int:
    """The CUDA devices this process would see, counted in a child process: asking CUDA here would
    initialise it in the Celery parent, and the pool processes it forks could then not use it."""
    probe = "import torch; print(torch.cuda.device_count())"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        return int(done.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        log.warning("could not count this machine's GPUs; serving one-GPU jobs only")
        return 0


def write_plan(path: Path, payload: dict[str, Any]) -> Path:
    """Write what the ranks need to know (it names the job's database and store: owner-only file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    return path


def torchrun_command(gpus: int, plan: Path) -> list[str]:
    """torchrun on this machine alone (`--standalone` picks a free rendezvous port) for `gpus` ranks."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc-per-node", str(gpus), "--max-restarts", "0",
        "-m", "worker.ranks", str(plan),
    ]  # fmt: skip


def launch_ranks(gpus: int, plan: Path, lost: threading.Event) -> int:
    """Run the job's ranks to their end and return torchrun's exit code.

    When the lease is lost (another worker or the reconciler took the job) the ranks are stopped:
    SIGTERM to torchrun, which passes it to its processes, then SIGKILL after a grace period.
    """
    proc = subprocess.Popen(torchrun_command(gpus, plan))
    log.info("started %d ranks (torchrun pid %d)", gpus, proc.pid)
    while True:
        try:
            return proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            if lost.is_set():
                return _stop(proc)


def _stop(proc: subprocess.Popen) -> int:
    log.warning("lease lost: stopping the ranks (torchrun pid %d)", proc.pid)
    proc.terminate()
    try:
        return proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
