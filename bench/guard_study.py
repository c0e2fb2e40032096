"""How the guard's criterion was chosen: label-free signals against the accuracy they should track.

    .venv/bin/python -m bench.suite --role dev --dump runs/guard            # defaults
    .venv/bin/python -m bench.suite --role dev --dump runs/guard-bad \\
        --hparams '{"lr": 1e-3}'                                           # runs that go wrong
    .venv/bin/python -m bench.guard_study runs/guard runs/guard-bad

Each dump holds, for one run, the guard sample's labels and every candidate's features and
probabilities on it (zero-shot, the teacher at the guard points and at the end, the student).
For each label-free criterion this prints what serving its top candidate would have scored
against serving zero-shot, and how often it picked a candidate worse than zero-shot. Labels
score here and nowhere else; this is a development tool on development cases only.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from services.must.guard import ZERO_SHOT, Guard, Outputs, knn_gain, neighbours

Criterion = Callable[[Guard, str, Outputs], float]


def _kappa(labels: torch.Tensor, graph: torch.Tensor, k: int) -> float:
    shares = torch.bincount(labels, minlength=k).float() / len(labels)
    chance = float((shares**2).sum())
    gain = knn_gain(labels, graph, k)
    return gain / (1.0 - chance) if chance < 1.0 - 1e-9 else 0.0


def _margin(score: Callable[[torch.Tensor, torch.Tensor, int], float]) -> Criterion:
    def criterion(guard: Guard, name: str, out: Outputs) -> float:
        zs, k = guard.zero_shot, guard.num_classes
        own = neighbours(out.features)
        return 0.5 * (
            (score(out.labels, guard.zs_graph, k) - score(zs.labels, guard.zs_graph, k))
            + (score(out.labels, own, k) - score(zs.labels, own, k))
        )

    return criterion


def _information(guard: Guard, name: str, out: Outputs) -> float:
    p = out.probs.clamp_min(1e-12)
    mean = p.mean(0)
    return float(-(mean * mean.log()).sum() + (p * p.log()).sum(1).mean()) / math.log(p.shape[1])


CRITERIA: dict[str, Criterion] = {
    "gain margin (both spaces)": lambda g, n, o: g.score(n, o, 0).margin if n != ZERO_SHOT else 0.0,
    "kappa margin (both spaces)": _margin(_kappa),
    "gain, zero-shot space only": lambda g, n, o: knn_gain(o.labels, g.zs_graph, g.num_classes),
    "gain, own space only": lambda g, n, o: knn_gain(o.labels, neighbours(o.features), g.num_classes),
    "information maximisation": _information,
    "mean confidence": lambda g, n, o: float(o.probs.max(1).values.mean()),
}


def _load(path: Path) -> tuple[torch.Tensor, dict[str, Outputs]]:
    tensors = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k != "labels"})
    outputs = {n: Outputs(tensors[f"{n}.features"], tensors[f"{n}.probs"]) for n in names}
    return tensors["labels"], outputs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dumps", nargs="+", type=Path, help="folders of bench.suite --dump files")
    args = parser.parse_args()
    files = sorted(f for d in args.dumps for f in d.glob("*.safetensors"))
    chosen: dict[str, list[float]] = {name: [] for name in [*CRITERIA, "oracle (labels)"]}
    print(f"{'run':<40} {'candidate':<16} {'top-1':>6}  " + "  ".join(f"{c[:14]:>14}" for c in CRITERIA))
    for f in files:
        labels, outputs = _load(f)
        guard = Guard(outputs[ZERO_SHOT])
        acc = {n: 100.0 * float((o.labels == labels).float().mean()) for n, o in outputs.items()}
        values = {c: {n: fn(guard, n, o) for n, o in outputs.items()} for c, fn in CRITERIA.items()}
        for n in outputs:
            row = "  ".join(f"{values[c][n]:>14.4f}" for c in CRITERIA)
            print(f"{f.parent.name + '/' + f.stem:<40} {n:<16} {acc[n]:>6.1f}  {row}")
        for c in CRITERIA:
            best = max(values[c], key=values[c].get)  # type: ignore[arg-type]
            chosen[c].append(acc[best] - acc[ZERO_SHOT])
        chosen["oracle (labels)"].append(max(acc.values()) - acc[ZERO_SHOT])
    print(f"\n{'criterion':<30} {'mean gain':>9} {'min gain':>9} {'runs below zero-shot':>21}")
    for c, gains in chosen.items():
        below = sum(g < 0 for g in gains)
        print(f"{c:<30} {sum(gains) / len(gains):>+9.2f} {min(gains):>+9.2f} {below:>14}/{len(gains)}")


if __name__ == "__main__":
    main()
