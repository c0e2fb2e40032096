"""One rank of a test run under torchrun: `adapt()` with hooks that the engine's CLI has no flags for.

python -m torch.distributed.run --nproc-per-node 2 -m tests.services.must.distributed_driver \\
    --images DIR --out DIR --model-config cfg.json --checkpoint w.safetensors --config '{...}'

Rank 0 writes each step's record to `out/metrics.jsonl`; `--cancel-after K` cancels once K steps
are done in this launch (the run then exits 0 and leaves `out/cancelled`); `--step-delay`
slows rank 0's steps so a test can kill a rank mid-run. Every rank writes its pid to
`out/rank-<r>.pid` (rewritten when torchrun restarts the group).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from services.must import distributed
from services.must.adapt import adapt
from services.must.config import MustConfig
from services.must.errors import Cancelled
from services.must.loading import ModelSpec
from services.must.trainer import StepMetrics, TrainerHooks, describe

CLASSES = ["circle", "square", "triangle", "star"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model-config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", required=True, help="MustConfig fields as JSON")
    p.add_argument("--cancel-after", type=int, default=None)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--out-per-rank", action="store_true", help="each rank its own out/rank-<r> folder")
    return p


def _hooks(args: argparse.Namespace) -> TrainerHooks:
    done = 0

    def on_step(metrics: StepMetrics) -> None:
        nonlocal done
        done += 1
        with open(args.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(describe(metrics)) + "\n")
        time.sleep(args.step_delay)

    def should_cancel() -> bool:
        return args.cancel_after is not None and done >= args.cancel_after

    return TrainerHooks(on_step=on_step, should_cancel=should_cancel)


def main() -> int:
    args = _parser().parse_args()
    rank = distributed.init_from_env()
    if args.out_per_rank:  # as on machines without a shared file system
        args.out = args.out / f"rank-{rank.rank}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{rank.rank}.pid").write_text(str(os.getpid()))
    try:
        adapt(
            args.images,
            CLASSES,
            out_dir=args.out,
            model=ModelSpec(config=args.model_config, checkpoint=args.checkpoint),
            config=MustConfig.from_dict(json.loads(args.config)),
            hooks=_hooks(args),
        )
    except Cancelled:
        if rank.is_main:
            (args.out / "cancelled").write_text("cancelled")
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
