"""MUST with the platform's defaults on a suite of domains it was never tuned for.

    .venv/bin/python -m bench.suite [--cases NAME ...] [--role dev|confirm] [--jobs N]

Every case runs the call a user's job makes, with no per-case or per-model settings: unlabeled
target images in a folder, the class names, the model, and nothing else (`start`, `train`,
`choose`, `export`, as `adapt()` and the worker run them). Labels only score held-out target
images of each case: zero-shot, the EMA teacher and the student at the end, and the classifier
the label-free guard chose to serve. The defaults were chosen on the `dev` cases only and then
frozen; the `confirm` cases were run once after that, and are reported as they came.

`--jobs N` runs N cases at a time in separate processes, each with cores/N threads: on a
small CPU two single-threaded trainings of a tiny CLIP move ~1.4x the images of one with two
threads. Each case is the same run either way (its seeds do not depend on the schedule).

Prints a table per case, then, as its last line, one JSON object with `cases`,
`mean_gain_served`, `min_gain_served` and `seconds`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

from bench import glyphs, shapes
from bench.tiny_clip import GLYPHS_CLIP_SPEC, TINY_CLIP_SPEC
from services.must.adapt import Adaptation, list_images, start
from services.must.config import MustConfig
from services.must.evaluation import top1
from services.must.export import load_classifier
from services.must.loading import ModelSpec
from services.must.trainer import StepMetrics, TrainerHooks

Sampler = Callable[[int, int], tuple[Image.Image, int]]


@dataclass(frozen=True)
class Case:
    """One target domain: a model, the classes the user names, a shift, and how many images."""

    name: str
    model: str
    shift: str
    train_images: int
    role: str
    class_names: tuple[str, ...]
    sampler: Sampler = field(compare=False)

    def images(self, count: int, seed: int) -> Iterator[tuple[Image.Image, int]]:
        for i in range(count):
            yield self.sampler(i, seed)


MODELS: dict[str, ModelSpec] = {"shapes": TINY_CLIP_SPEC, "glyphs": GLYPHS_CLIP_SPEC}


def _shapes(style: shapes.TargetStyle, classes: tuple[str, ...]) -> Sampler:
    ids = tuple(shapes.CLASS_NAMES.index(c) for c in classes)

    def draw(index: int, seed: int) -> tuple[Image.Image, int]:
        return shapes.sample("target", index, seed, style=style, classes=ids)

    return draw


def _glyphs(preset: str, classes: tuple[str, ...]) -> Sampler:
    ids = tuple(glyphs.CLASS_NAMES.index(c) for c in classes)
    total = len(glyphs.CLASS_NAMES)

    def draw(index: int, seed: int) -> tuple[Image.Image, int]:
        # glyphs.sample labels image i as i % 106; this index draws class ids[index % K] instead.
        label = index % len(ids)
        image, _ = glyphs.sample("target", (index // len(ids)) * total + ids[label], seed, style=preset)
        return image, label

    return draw


SHAPE_CLASSES = shapes.CLASS_NAMES
GLYPH_CLASSES = glyphs.CLASS_NAMES
# Digits and capital letters (the glyph classes name them "digit 7", "capital a").
DIGITS_AND_CAPITALS = tuple(c for c in GLYPH_CLASSES if c.startswith(("digit ", "capital ")) and len(c) <= 9)
SHAPES_FOUR = ("triangle", "star", "crescent", "arrow")
_S = shapes.TargetStyle

CASES: tuple[Case, ...] = (
    Case(
        "shapes-closeup",
        "shapes",
        "framing, background, noise",
        3000,
        "dev",
        SHAPE_CLASSES,
        _shapes(_S(), SHAPE_CLASSES),
    ),
    Case(
        "glyphs-colour",
        "glyphs",
        "colour: ink on tinted, shaded paper",
        3000,
        "dev",
        GLYPH_CLASSES,
        _glyphs("colour", GLYPH_CLASSES),
    ),
    Case(
        "shapes-4-low-contrast",
        "shapes",
        "contrast and background",
        500,
        "confirm",
        SHAPES_FOUR,
        _shapes(_S(contrast=(0.3, 0.5)), SHAPES_FOUR),
    ),
    Case(
        "shapes-rotated",
        "shapes",
        "rotation, framing, background",
        2000,
        "confirm",
        SHAPE_CLASSES,
        _shapes(_S(tilt=(-3.14159, 3.14159)), SHAPE_CLASSES),
    ),
    Case(
        "glyphs-style",
        "glyphs",
        "style: serif typefaces",
        10000,
        "confirm",
        GLYPH_CLASSES,
        _glyphs("style", GLYPH_CLASSES),
    ),
    Case(
        "glyphs-34-blur",
        "glyphs",
        "resolution, blur, noise",
        2000,
        "confirm",
        DIGITS_AND_CAPITALS,
        _glyphs("blur", DIGITS_AND_CAPITALS),
    ),
    Case(
        "glyphs-rotation",
        "glyphs",
        "rotation",
        1000,
        "confirm",
        GLYPH_CLASSES,
        _glyphs("rotation", GLYPH_CLASSES),
    ),
)


# Each is the defaults with one part of MUST changed, run on the chosen cases with --ablations.
ABLATIONS: dict[str, dict[str, Any]] = {
    "self-training only": {"fairness_weight": 0.0, "mim_weight": 0.0, "align_weight": 0.0, "mask_ratio": 0.0},
    "without fairness": {"fairness_weight": 0.0},
    "fairness over one batch": {"fairness_samples": 1},
    "reference views": {"strong_crop_min": 0.3, "rand_augment": "rand-n2-m9-mstd0.5-inc1", "hflip": True},
}


@dataclass
class Result:
    case: Case
    zero_shot: float
    teacher: float
    student: float
    served: float
    served_name: str
    seconds: float
    notes: dict[str, Any]
    ablation: str | None = None

    @property
    def gain(self) -> float:
        return self.served - self.zero_shot

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.name,
            **({"ablation": self.ablation} if self.ablation else {}),
            "role": self.case.role,
            "model": self.case.model,
            "shift": self.case.shift,
            "classes": len(self.case.class_names),
            "images": self.case.train_images,
            "zero_shot": round(self.zero_shot, 2),
            "teacher": round(self.teacher, 2),
            "student": round(self.student, 2),
            "served": round(self.served, 2),
            "served_classifier": self.served_name,
            "gain_served": round(self.gain, 2),
            "minutes": round(self.seconds / 60, 2),
            **self.notes,
        }


def _write(case: Case, count: int, seed: int, out: Path) -> dict[Path, int]:
    """The case's unlabeled images as PNG files; returns their labels, which only score."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, (image, label) in enumerate(case.images(count, seed)):
        path = out / f"{case.name}-{seed}-{i:06d}.png"
        image.save(path)
        labels[path] = label
    return labels


def _progress(case: Case) -> TrainerHooks:
    """A line on stderr at every tenth of the schedule."""

    def on_step(m: StepMetrics) -> None:
        if m.step == m.total_steps or m.step % max(1, m.total_steps // 10) == 0:
            print(
                f"  {case.name}: step {m.step}/{m.total_steps}, {m.images_per_sec:.0f} img/s, "
                f"eta {m.eta_s / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )

    return TrainerHooks(on_step=on_step)


def _dump(run: Adaptation, labels: dict[Path, int], out: Path) -> None:
    """The guard sample's labels and every candidate's outputs, for bench.guard_study."""
    tensors = {"labels": torch.tensor([labels[p] for p in run.guard_paths])}
    for name, outputs in run.seen.items():
        tensors[f"{name}.features"] = outputs.features.contiguous()
        tensors[f"{name}.probs"] = outputs.probs.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))


def _test_set(run: Adaptation, case: Case, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*case.images(count, seed=9001), strict=True)
    return run.prepared.classifier().preprocess(list(images)), torch.tensor(labels)


def run_case(
    case: Case, work: Path, test_images: int, config: MustConfig | None = None, dump: Path | None = None
) -> Result:
    """One case as a user's job runs it (defaults unless `config`: smoke runs and ablations)."""
    folder = work / case.name / "unlabeled"
    labels = _write(case, case.train_images, seed=7, out=folder)
    began = time.perf_counter()
    paths, skipped = list_images(folder)
    run = start(paths, case.class_names, model=MODELS[case.model], config=config)
    test = _test_set(run, case, test_images)
    zero_shot = top1(run.prepared.classifier(), *test)
    fit = run.train(work / case.name / "checkpoints", _progress(case))
    decision = run.choose()
    run.export(work / case.name / "classifier", fit, skipped)
    if dump is not None:
        _dump(run, labels, dump / f"{case.name}.safetensors")
    seconds = time.perf_counter() - began
    notes = {
        "steps": run.config.total_steps,
        "views": f"crop {run.config.strong_crop_min} {run.config.rand_augment} flip={run.config.hflip}",
        "guard": {c.name: round(c.margin, 4) for c in decision.candidates},
    }
    return Result(
        case,
        zero_shot,
        top1(run.prepared.classifier(run.task.teacher.module), *test),  # type: ignore[arg-type]
        top1(run.prepared.classifier(run.task.student), *test),
        top1(load_classifier(work / case.name / "classifier"), *test),
        decision.served,
        seconds,
        notes,
    )


def _print(results: list[Result]) -> None:
    head = f"{'case':<22} {'role':<8} {'K':>4} {'n':>6} {'zero-shot':>9} {'teacher':>8} {'student':>8}"
    print(f"\n{head} {'served':>7} {'(which)':<14} {'gain':>6} {'min':>6}")
    for r in results:
        c = r.case
        name = f"{c.name} [{r.ablation}]" if r.ablation else c.name
        print(
            f"{name:<22} {c.role:<8} {len(c.class_names):>4} {c.train_images:>6} {r.zero_shot:>9.1f} "
            f"{r.teacher:>8.1f} {r.student:>8.1f} {r.served:>7.1f} {r.served_name:<14} {r.gain:>+6.1f} "
            f"{r.seconds / 60:>6.1f}"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument(
        "--role", choices=["dev", "confirm"], help="only the development or confirmation cases"
    )
    parser.add_argument("--test-images", type=int, default=1000, help="held-out labelled images per case")
    parser.add_argument("--train-images", type=int, help="smoke runs: fewer unlabeled images per case")
    parser.add_argument("--steps", type=int, help="smoke runs: fewer steps (overrides the default schedule)")
    parser.add_argument(
        "--hparams", type=json.loads, default={}, help="development only: overrides of the defaults (JSON)"
    )
    parser.add_argument(
        "--ablations", action="store_true", help=f"also run each ablation: {', '.join(ABLATIONS)}"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="cases run at a time, each in its own process (cores/N threads)"
    )
    parser.add_argument(
        "--dump",
        type=Path,
        help="write each case's guard-sample outputs here, defaults runs only (guard study)",
    )
    return parser


def _selected(args: argparse.Namespace) -> list[Case]:
    chosen = [
        c
        for c in CASES
        if (not args.cases or c.name in args.cases) and (not args.role or c.role == args.role)
    ]
    if args.train_images:
        chosen = [Case(**{**c.__dict__, "train_images": args.train_images}) for c in chosen]
    return chosen


def _summary(results: list[Result], seconds: float, overrides: dict[str, Any]) -> dict[str, Any]:
    headline = [r for r in results if r.ablation is None]
    gains = [r.gain for r in headline]
    return {
        "cases": [r.to_dict() for r in headline],
        "mean_gain_served": round(sum(gains) / len(gains), 2) if gains else None,
        "min_gain_served": round(min(gains), 2) if gains else None,
        "seconds": round(seconds, 1),
        "hparams": overrides,
        "ablations": [r.to_dict() for r in results if r.ablation is not None],
    }


def _threads(count: int) -> None:
    torch.set_num_threads(count)


def _run_named(
    name: str, train_images: int, work: Path, test_images: int, values: dict[str, Any], dump: Path | None
) -> dict[str, Any]:
    """`run_case` in a worker process, by name (a case's sampler does not cross processes)."""
    case = next(c for c in CASES if c.name == name)
    case = Case(**{**case.__dict__, "train_images": train_images})
    result = run_case(case, work, test_images, MustConfig.from_dict(values) if values else None, dump)
    return {f.name: getattr(result, f.name) for f in fields(Result) if f.name != "case"}


def _size(case: Case) -> int:
    return case.train_images * (3 if case.model == "glyphs" else 2)  # glyph CLIP steps cost ~1.5x


def main() -> None:
    args = _parser().parse_args()
    overrides = dict(args.hparams)
    if args.steps:
        overrides |= {"total_steps": args.steps, "guard_images": 64}
    if overrides:
        print(f"NOT THE DEFAULTS (smoke run or development): {overrides}", file=sys.stderr)
    runs = [(None, overrides)]
    if args.ablations:
        runs += [(name, {**overrides, **changes}) for name, changes in ABLATIONS.items()]
    # Largest first, so that N processes finish close together.
    work_items = sorted(
        ((case, ablation, values) for case in _selected(args) for ablation, values in runs),
        key=lambda item: -_size(item[0]),
    )
    began = time.perf_counter()
    results = []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="must-suite-") as tmp,
        ProcessPoolExecutor(args.jobs, spawn, initializer=_threads, initargs=(threads,)) as pool,
    ):
        futures = {
            pool.submit(
                _run_named,
                case.name,
                case.train_images,
                Path(tmp) / (ablation or "defaults").replace(" ", "-"),
                args.test_images,
                values,
                args.dump if not ablation else None,
            ): (case, ablation)
            for case, ablation, values in work_items
        }
        for future in as_completed(futures):
            case, ablation = futures[future]
            result = Result(case=case, **future.result())
            result.ablation = ablation
            results.append(result)
            print(json.dumps(result.to_dict()), flush=True)
    order = {(c.name, a): i for i, (c, a) in enumerate((c, a) for c in CASES for a, _ in runs)}
    results.sort(key=lambda r: order[(r.case.name, r.ablation)])
    _print(results)
    print(json.dumps(_summary(results, time.perf_counter() - began, overrides)))


if __name__ == "__main__":
    main()
