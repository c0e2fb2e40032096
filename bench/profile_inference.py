"""Where a `POST /predict` request's time goes in the inference service: stages and the event loop's profile.

    .venv/bin/python -m bench.profile_inference [--model tiny] [--in-flight 32] [--requests 2000]

The service runs in this process under uvicorn, on the artifact and job database that
`bench.inference` builds; a client subprocess keeps `--in-flight` requests of one JPEG each in
flight. Prints, per request:

- with one request in flight, the median time of each stage, from the request entering the ASGI
  app to its answer leaving: route (body, form, model lookup) → decoding → forward queue →
  forward → rows back on the event loop → answer written (a lone small request runs decoding
  and forward on the event loop itself, so its queue and hand-off back take no time);
- with more, the forwards: how many, their mean batch, and how much of the run the forward
  thread was busy (near 100%: the model is the bottleneck; well below: the service is);
- the CPU time per request of the event loop thread, and of the decoding and forward steps in
  whichever thread ran them (`time.thread_time`), and the event loop's most costly functions by
  cumulative time (cProfile runs on the event loop thread only; its times are wall times, so they include
  waits for the GIL that the other threads hold).

cProfile slows Python code by about half again, so the absolute figures are higher than in
`bench.inference`; the split between stages and functions is what it is for.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.inference import CASES, export_artifact, jpeg_images, predict_request, record_adaptation
from bench.loopback import free_port

STAGES = ("asgi_in", "decode_start", "decode_end", "forward_start", "forward_end", "answered", "asgi_out")
CLIENT = """
import json, sys, time
from bench.inference import measure_service
requests = [r.encode("latin-1") for r in json.load(open(sys.argv[1]))]
time.sleep(1.0)
port, in_flight, total = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(json.dumps(measure_service(port, requests, in_flight, total).__dict__))
"""


class Marks:
    """perf_counter() stamps per stage, and thread CPU seconds per instrumented step, from every thread."""

    def __init__(self) -> None:
        self.stamps: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.cpu: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        with self._lock:
            self.stamps[stage].append(now)

    def around(self, owner: Any, name: str, before: str, after: str) -> None:
        """Stamp `before` and `after` around every call of `owner.name`."""
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.mark(before)
            cpu = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.thread_time() - cpu
                self.mark(after)
                with self._lock:
                    self.cpu[name] = self.cpu.get(name, 0.0) + spent

        setattr(owner, name, timed)

    def medians_ms(self, skip: int) -> dict[str, float]:
        """Median milliseconds between consecutive stages (one image per request, one at a time in order)."""
        count = min(len(v) for v in self.stamps.values())
        out = {}
        for a, b in zip(STAGES, STAGES[1:], strict=False):
            gaps = [
                y - x for x, y in zip(self.stamps[a][skip:count], self.stamps[b][skip:count], strict=True)
            ]
            out[f"{a} -> {b}"] = statistics.median(gaps) * 1e3 if gaps else float("nan")
        return out


def instrument(marks: Marks) -> None:
    """Stamp the stages of the predictor and the batcher (the service's own code stays as it is)."""
    import api.inference.batching as batching
    from api.inference.predictor import Predictor

    marks.around(Predictor, "_decode", "decode_start", "decode_end")
    marks.around(Predictor, "forward", "forward_start", "forward_end")
    resolve, run_here = batching._resolve, Predictor._run_here

    def answered(*args: Any) -> None:
        marks.mark("answered")
        resolve(*args)

    def answered_here(*args: Any, **kwargs: Any) -> Any:
        result = run_here(*args, **kwargs)
        if result is not None:  # the request ran on the event loop: no hand-off back
            marks.mark("answered")
        return result

    batching._resolve = answered  # type: ignore[assignment]
    Predictor._run_here = answered_here  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", choices=sorted(CASES))
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25, help="event-loop functions to list (0: no profile)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="must-profile-inference-"))
    case = CASES[args.model]
    env, job_id = record_adaptation(export_artifact(case, root / "export"), root)
    os.environ.update(env)
    from api.inference.runtime import prefer_passive_openmp

    prefer_passive_openmp()  # as api.inference.main does before torch is first used
    import uvicorn

    from api.inference.main import create_app

    marks = Marks()
    instrument(marks)
    app = create_app()

    async def timed_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            marks.mark("asgi_in")
        await app(scope, receive, send)
        if scope["type"] == "http":
            marks.mark("asgi_out")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(timed_app, host="127.0.0.1", port=port, log_level="warning"))
    requests = [predict_request(job_id, data).decode("latin-1") for data in jpeg_images(case, 64)]
    (root / "requests.json").write_text(json.dumps(requests))
    total = args.requests + args.in_flight
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLIENT,
            str(root / "requests.json"),
            str(port),
            str(args.in_flight),
            str(total),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )

    def stop_when_done() -> None:
        client.wait()
        server.should_exit = True

    threading.Thread(target=stop_when_done, daemon=True).start()
    profile = cProfile.Profile()
    loop_cpu = time.thread_time()
    if args.top:
        profile.enable()
    server.run()
    profile.disable()
    loop_cpu = time.thread_time() - loop_cpu
    level = json.loads(client.stdout.read() if client.stdout else "{}")

    report(args, marks, level, profile, loop_cpu)


def report(
    args: argparse.Namespace, marks: Marks, level: dict[str, Any], profile: cProfile.Profile, loop_cpu: float
) -> None:
    """Print the stages, the forwards, CPU per request by thread and the event loop's profile."""
    served = len(marks.stamps["asgi_out"])
    print(f"{args.model}, {args.in_flight} in flight, {served} requests: {json.dumps(level)}")
    if args.in_flight == 1:
        print("\nstage medians (ms):")
        for gap, ms in marks.medians_ms(skip=10).items():
            print(f"  {gap:<32} {ms:8.3f}")
    starts, ends = marks.stamps["forward_start"], marks.stamps["forward_end"]
    busy = sum(end - start for start, end in zip(starts, ends, strict=False))
    wall = marks.stamps["asgi_out"][-1] - marks.stamps["asgi_in"][0]
    print(
        f"\nforwards: {len(starts)}, mean batch {served / max(1, len(starts)):.1f} images, "
        f"forwards busy {100 * busy / wall:.0f}% of the run"
    )
    print(
        "\nCPU per request (ms):"
        if not args.top
        else "\nCPU per request (ms; the event loop's includes cProfile's own cost):"
    )
    print(
        "  (decoding and forward: in whichever thread ran them; a lone request runs both on the event loop)"
    )
    print(f"  event loop thread   {loop_cpu / served * 1e3:8.3f}")
    print(f"  decoding            {marks.cpu.get('_decode', 0.0) / served * 1e3:8.3f}")
    print(f"  forward             {marks.cpu.get('forward', 0.0) / served * 1e3:8.3f}")
    if not args.top:
        return
    stats = pstats.Stats(profile)
    print(f"\nevent loop, top {args.top} by cumulative time (ms per request):")
    rows = sorted(stats.stats.items(), key=lambda item: item[1][3], reverse=True)  # type: ignore[attr-defined]
    shown = 0
    for (file, line, name), (_, _, _, cumulative, _) in rows:
        if name in ("run", "run_forever", "_run_once", "select") or "asyncio" in file and name == "_run":
            continue
        print(f"  {cumulative / max(1, served) * 1e3:8.3f}  {Path(file).name}:{line} {name}")
        shown += 1
        if shown >= args.top:
            break


if __name__ == "__main__":
    main()
