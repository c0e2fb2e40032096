"""`python -m api.inference.serve`: the inference service in worker processes with a listening socket each.

    python -m api.inference.serve --host 0.0.0.0 --port 8001 [--workers N] [--no-proxy-headers]

uvicorn's `--workers` shares one listening socket between its processes, and the worker whose
event loop wakes first accepts every connection that is waiting. A burst of connections (a
client's or a gateway's pool opening) can so land mostly on one worker, which serves them for
as long as they are kept alive while the others idle: in bench.inference at 32 requests in
flight, one of two ViT-B-32 workers ran about 30 batched forwards and the other 5. Here each
worker binds a socket of its own to the same address with SO_REUSEPORT, and the kernel gives
each new connection to one of them by a hash of its addresses.

`--workers` defaults to WEB_CONCURRENCY, as uvicorn's does, else 1 (served in this process).
A worker that dies is started again; one that fails at startup (uvicorn's exit status 3, a
configuration error) stops the service with that status, since another would fail the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

from api.common.logs import use_json_logs
from services.config import get_settings

APP = "api.inference.main:create_app"
# uvicorn's exit status when the app fails to start.
STARTUP_FAILURE = 3
# Seconds a worker has to finish its requests after SIGTERM before it is killed.
GRACE_S = 30.0

log = logging.getLogger("api.inference.serve")


@dataclass(frozen=True)
class ServeOptions:
    """Where and how the workers listen."""

    host: str = "127.0.0.1"
    port: int = 8001
    workers: int = 1
    proxy_headers: bool = True
    log_level: str = "info"
    access_log: bool = True


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) that other workers may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve_one(options: ServeOptions, supervisor: int | None = None) -> None:
    """One worker: uvicorn serving the inference app on a socket of its own.

    `supervisor`: the pid of the process that started it; the worker stops when that one dies
    (even by SIGKILL), so no worker outlives its service.
    """
    if supervisor is not None:
        _stop_with(supervisor)
    config = uvicorn.Config(
        APP,
        factory=True,
        host=options.host,
        port=options.port,
        proxy_headers=options.proxy_headers,
        log_level=options.log_level,
        access_log=options.access_log,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[listening_socket(options.host, options.port)])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _stop_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent exits (Linux's PR_SET_PDEATHSIG)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(0)


def supervise(options: ServeOptions) -> int:
    """Run `options.workers` workers until SIGTERM or SIGINT; the exit status."""
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = [_start(context, options) for _ in range(options.workers)]
    status = 0
    while not stopping.wait(0.5):
        for i, worker in enumerate(workers):
            if worker.is_alive():
                continue
            if worker.exitcode == STARTUP_FAILURE:
                log.error("an inference worker failed to start; stopping the service")
                status = STARTUP_FAILURE
                stopping.set()
                break
            log.warning("inference worker %s exited (%s); starting another", worker.pid, worker.exitcode)
            workers[i] = _start(context, options)
    _stop(workers)
    return status


def _start(context: multiprocessing.context.SpawnContext, options: ServeOptions) -> BaseProcess:
    worker = context.Process(target=serve_one, args=(options, os.getpid()), name="inference-worker")
    worker.start()
    return worker


def _stop(workers: list[BaseProcess]) -> None:
    """SIGTERM (uvicorn then finishes the requests in flight), then SIGKILL after GRACE_S."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(GRACE_S)
        if worker.is_alive():
            worker.kill()
            worker.join()


def parse_args(argv: list[str] | None = None) -> ServeOptions:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "1")))
    parser.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trust X-Forwarded-* from FORWARDED_ALLOW_IPS (uvicorn's option and default)",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return ServeOptions(
        args.host, args.port, args.workers, args.proxy_headers, args.log_level, args.access_log
    )


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    if options.workers == 1:
        serve_one(options)
        return
    use_json_logs(get_settings())  # the workers' lines are JSON objects in that mode; so are these
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(supervise(options))


if __name__ == "__main__":
    main()
