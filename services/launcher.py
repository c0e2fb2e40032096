"""Run the platform's three processes (control API, inference service, worker) from one command.

The embedded default and the tests start the same commands the containers run, as child
processes of one parent, each logging to its own file:

    .venv/bin/python -m services.launcher        # SQLite, filesystem broker, ./.must/store

The processes share the parent's `MUST_*` environment, so they agree on the database, broker
and object store. Importing this module starts nothing and loads no torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTROL_APP = "api.control.main:create_app"
INFERENCE_APP = "api.inference.main:create_app"
# Celery prints this once its consumer is connected and waiting for tasks.
WORKER_READY = b" ready."


class LaunchError(RuntimeError):
    """A process exited or did not become ready in time; the message points at its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def uvicorn_command(app: str, host: str, port: int) -> list[str]:
    """The command that serves an app factory, as the api and inference containers run it."""
    return [sys.executable, "-m", "uvicorn", app, "--factory", "--host", host, "--port", str(port)]


def worker_command(name: str) -> list[str]:
    """The command of one training worker: the `gpu` queue, one job at a time."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", "gpu", "--concurrency", "1", "--pool", "solo", "--loglevel", "INFO", "-n", name,
    ]  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (a warm shutdown for Celery, graceful for uvicorn), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Child:
    """One started process and the file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the process's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise a LaunchError with the log tail if the process has exited."""
        if self.proc.poll() is not None:
            code = self.proc.returncode
            raise LaunchError(f"{self.name} exited with code {code}; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the process (see `stop_process`)."""
        stop_process(self.proc, timeout)


@dataclass
class Platform:
    """The control API, inference service and workers of one environment, on loopback ports."""

    env: Mapping[str, str]
    log_dir: Path
    host: str = "127.0.0.1"
    control_port: int = field(default_factory=free_port)
    inference_port: int = field(default_factory=free_port)
    ready_timeout: float = 120.0
    children: dict[str, Child] = field(default_factory=dict)
    _workers_started: int = 0

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.inference_port}"

    def _spawn(self, name: str, command: list[str], extra_env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, **self.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        child = Child(name, proc, log_path)
        self.children[name] = child
        return child

    def _wait_http(self, child: Child, url: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            child.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise LaunchError(f"{child.name} was not ready at {url} within {self.ready_timeout:.0f} s")

    def _wait_log(self, child: Child, marker: bytes) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            child.check_alive()
            if marker in child.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise LaunchError(f"{child.name} did not report ready within {self.ready_timeout:.0f} s")

    def start_control_api(self) -> None:
        child = self._spawn("control", uvicorn_command(CONTROL_APP, self.host, self.control_port))
        self._wait_http(child, f"{self.control_url}/readyz")

    def start_inference(self) -> None:
        child = self._spawn("inference", uvicorn_command(INFERENCE_APP, self.host, self.inference_port))
        self._wait_http(child, f"{self.inference_url}/readyz")

    def start_worker(self, extra_env: Mapping[str, str] | None = None) -> Child:
        """Start one more worker process (worker-1, worker-2, ...) and wait until it consumes.

        `extra_env` adds to or overrides the platform's environment for this worker only.
        """
        self._workers_started += 1
        name = f"worker-{self._workers_started}"
        child = self._spawn(name, worker_command(f"{name}@%h"), extra_env)
        self._wait_log(child, WORKER_READY)
        return child

    def start(self) -> Platform:
        """Start the control API, the inference service and one worker; wait until all are ready."""
        try:
            self.start_control_api()
            self.start_inference()
            self.start_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def workers(self) -> list[Child]:
        return [child for name, child in self.children.items() if name.startswith("worker-")]

    def stop(self) -> None:
        """Stop every child: workers first, so none is left without its database or store."""
        for child in sorted(self.children.values(), key=lambda c: not c.name.startswith("worker-")):
            child.stop()

    def __enter__(self) -> Platform:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _stop_on_sigterm() -> None:
    """Make SIGTERM (what `kill`, systemd and container runtimes send) stop the platform as Ctrl-C does.

    Python's default SIGTERM action ends the process at once, without unwinding: the children
    would be left running, orphaned.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    """Serve the platform in the foreground until Ctrl-C or SIGTERM, then stop every child."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--control-port", type=int, default=8000)
    parser.add_argument("--inference-port", type=int, default=8001)
    parser.add_argument("--log-dir", type=Path, default=Path(".must/logs"))
    args = parser.parse_args(argv)
    _stop_on_sigterm()
    platform = Platform(
        env={},
        log_dir=args.log_dir,
        host=args.host,
        control_port=args.control_port,
        inference_port=args.inference_port,
    )
    try:
        platform.start()
    except KeyboardInterrupt:  # stopped while starting: start() has already stopped what it began
        return 0
    try:
        print(f"control API  {platform.control_url}/docs")
        print(f"inference    {platform.inference_url}/docs")
        print(f"logs         {args.log_dir}/  (Ctrl-C stops everything)")
        while True:
            for child in platform.children.values():
                child.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # Ignore further signals while the children shut down, so a second one cannot orphan them.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        platform.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
