"""MUST with the platform's defaults on a suite of domains it was never tuned for.

    .venv/bin/python -m bench.suite [--cases NAME ...] [--role dev|confirm] [--jobs N] [--instant-only]

Every case runs the call a user's job makes, with no per-case or per-model settings: unlabeled
target images in a folder, the class names, the model, and nothing else (`start`, `train`,
`choose`, `export`, as `adapt()` and the worker run them). Labels only score held-out target
images of each case: zero-shot, the EMA teacher and the student at the end, and the classifier
the label-free guard chose to serve. The defaults were chosen on the `dev` cases only and then
frozen; the `confirm` cases were run once after that, and are reported as they came.

`--jobs N` runs N cases at a time in separate processes, each with cores/N threads: on a
small CPU two single-threaded trainings of a tiny CLIP move ~1.4x the images of one with two
threads. Each case is the same run either way (its seeds do not depend on the schedule).

Each case also runs the instant method (`services.must.instant`: a training-free,
transductive fit of the head on the images' features) on the same images, timed on its own:
its served accuracy after the same guard, and its seconds beside MUST's. `--instant-only`
skips MUST; `must_seconds` is then the sum of the cases' minutes in the last recorded full
MUST run (`RECORDED_MUST_MINUTES`), and `must_seconds_source` says so.

Prints a table per case, then, as its last line, one JSON object with `cases`,
`mean_gain_served`, `min_gain_served`, `mean_gain_instant`, `min_gain_instant`,
`instant_seconds`, `must_seconds` and `seconds`.
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

from bench import few_label, glyphs, shapes
from bench.tiny_clip import GLYPHS_CLIP_SPEC, TINY_CLIP_SPEC
from services.must.adapt import Adaptation, list_images, start
from services.must.config import MustConfig
from services.must.evaluation import top1
from services.must.export import load_classifier
from services.must.instant import FolderFeatureCache, start_instant
from services.must.loading import ModelSpec
from services.must.trainer import StepMetrics, TrainerHooks
from services.must.transductive import InstantConfig

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


# Minutes per case of the last recorded full MUST run (README, commit a35e6f7: `--jobs 2` on the
# 2-core development machine); the reference for `--instant-only` runs, which skip MUST.
RECORDED_MUST_MINUTES = {
    "shapes-closeup": 20.9,
    "glyphs-colour": 33.5,
    "shapes-4-low-contrast": 3.7,
    "shapes-rotated": 14.7,
    "glyphs-style": 103.9,
    "glyphs-34-blur": 19.4,
    "glyphs-rotation": 10.4,
}
# Served top-1 of the same run, for the few-label table's "MUST without labels" column.
RECORDED_MUST_SERVED = {
    "shapes-closeup": 75.7,
    "glyphs-colour": 67.3,
    "shapes-4-low-contrast": 85.4,
    "shapes-rotated": 46.8,
    "glyphs-style": 58.3,
    "glyphs-34-blur": 78.0,
    "glyphs-rotation": 43.3,
}
RECORDED_SOURCE = "recorded: the README's full MUST run (commit a35e6f7, --jobs 2), not this run"


@dataclass
class InstantScore:
    """The instant method on a case: its head's accuracy, the guard's choice, and its time."""

    head: float
    served: float
    served_name: str
    seconds: float
    margin: float


@dataclass
class Result:
    case: Case
    zero_shot: float
    teacher: float | None
    student: float | None
    served: float | None
    served_name: str | None
    seconds: float | None
    notes: dict[str, Any]
    ablation: str | None = None
    instant: InstantScore | None = None

    @property
    def gain(self) -> float | None:
        return None if self.served is None else self.served - self.zero_shot

    @property
    def gain_instant(self) -> float | None:
        return None if self.instant is None else self.instant.served - self.zero_shot

    def _instant_dict(self) -> dict[str, Any]:
        i = self.instant
        if i is None:
            return {}
        return {
            "instant": round(i.head, 2),
            "instant_served": round(i.served, 2),
            "instant_served_classifier": i.served_name,
            "instant_margin": round(i.margin, 4),
            "gain_instant": round(i.served - self.zero_shot, 2),
            "instant_seconds": round(i.seconds, 2),
        }

    def to_dict(self) -> dict[str, Any]:
        must = self.served is not None
        return {
            "case": self.case.name,
            **({"ablation": self.ablation} if self.ablation else {}),
            "role": self.case.role,
            "model": self.case.model,
            "shift": self.case.shift,
            "classes": len(self.case.class_names),
            "images": self.case.train_images,
            "zero_shot": round(self.zero_shot, 2),
            "teacher": _round(self.teacher),
            "student": _round(self.student),
            "served": _round(self.served),
            "served_classifier": self.served_name,
            "gain_served": _round(self.gain),
            "minutes": round(self.seconds / 60, 2) if must and self.seconds is not None else None,
            **self._instant_dict(),
            **self.notes,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


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


def run_instant(
    case: Case, work: Path, test_images: int, instant: InstantConfig | None = None
) -> tuple[InstantScore, float]:
    """The instant method on the case's images, as an instant job runs it; timed from loading the
    model to the exported classifier (scoring the held-out images is not timed)."""
    folder = work / case.name / "unlabeled"
    if not folder.is_dir():
        _write(case, case.train_images, seed=7, out=folder)
    began = time.perf_counter()
    paths, skipped = list_images(folder)
    run = start_instant(
        paths,
        case.class_names,
        model=MODELS[case.model],
        instant=instant,
        cache=FolderFeatureCache(work / case.name / "features"),
    )
    fit = run.train()
    decision = run.choose()
    run.export(work / case.name / "instant", fit, skipped)
    seconds = time.perf_counter() - began
    images, labels = zip(*case.images(test_images, seed=9001), strict=True)
    test = run.zero_shot_classifier().preprocess(list(images)), torch.tensor(labels)
    margin = next(c.margin for c in decision.candidates if c.name == "instant")
    score = InstantScore(
        top1(run.instant_classifier(), *test),
        top1(load_classifier(work / case.name / "instant"), *test),
        decision.served,
        seconds,
        margin,
    )
    return score, top1(run.zero_shot_classifier(), *test)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print(results: list[Result]) -> None:
    head = f"{'case':<22} {'role':<8} {'K':>4} {'n':>6} {'zero-shot':>9} {'teacher':>8} {'student':>8}"
    tail = f"{'instant':>7} {'(which)':<10} {'gain':>6} {'sec':>6}"
    print(f"\n{head} {'served':>7} {'(which)':<14} {'gain':>6} {'min':>6} {tail}")
    for r in results:
        c, i = r.case, r.instant
        name = f"{c.name} [{r.ablation}]" if r.ablation else c.name
        must = (
            f"{_fmt(r.teacher, '>8.1f'):>8} {_fmt(r.student, '>8.1f'):>8} {_fmt(r.served, '>7.1f'):>7} "
            f"{r.served_name or '-':<14} {_fmt(r.gain, '>+6.1f'):>6} "
            f"{_fmt(None if r.seconds is None or r.served is None else r.seconds / 60, '>6.1f'):>6}"
        )
        instant = (
            f"{i.served:>7.1f} {i.served_name:<10} {r.gain_instant:>+6.1f} {i.seconds:>6.1f}"
            if i is not None
            else f"{'-':>7} {'-':<10} {'-':>6} {'-':>6}"
        )
        print(
            f"{name:<22} {c.role:<8} {len(c.class_names):>4} {c.train_images:>6} {r.zero_shot:>9.1f} "
            f"{must} {instant}"
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
        "--instant-only",
        action="store_true",
        help="run the instant method only (MUST skipped; must_seconds from the last recorded MUST run)",
    )
    parser.add_argument(
        "--few-label",
        action="store_true",
        help="few-label mode: 1, 4 and 16 labels per class against no labels and a linear probe "
        f"(cases default to {', '.join(few_label.CASES)})",
    )
    parser.add_argument(
        "--few-label-must", action="store_true", help="with --few-label: also MUST with the labels (long)"
    )
    parser.add_argument(
        "--instant-hparams",
        type=json.loads,
        default={},
        help="development only: overrides of the instant method's frozen settings (JSON)",
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


def _mean_min(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(sum(values) / len(values), 2), round(min(values), 2)


def _timing(headline: list[Result], recorded: bool) -> dict[str, Any]:
    """instant_seconds and must_seconds summed over the cases, and their ratio."""
    instant = sum(r.instant.seconds for r in headline if r.instant is not None)
    if recorded:
        must = 60 * sum(RECORDED_MUST_MINUTES[r.case.name] for r in headline)
        source = RECORDED_SOURCE
    else:
        must = sum(r.seconds or 0.0 for r in headline)
        source = "measured in this run"
    return {
        "instant_seconds": round(instant, 1),
        "must_seconds": round(must, 1),
        "must_seconds_source": source,
        "instant_time_ratio": round(instant / must, 5) if must else None,
    }


def _summary(
    results: list[Result], seconds: float, overrides: dict[str, Any], recorded_must: bool = False
) -> dict[str, Any]:
    headline = [r for r in results if r.ablation is None]
    mean, low = _mean_min([r.gain for r in headline if r.gain is not None])
    mean_instant, low_instant = _mean_min([r.gain_instant for r in headline if r.gain_instant is not None])
    return {
        "cases": [r.to_dict() for r in headline],
        "mean_gain_served": mean,
        "min_gain_served": low,
        "mean_gain_instant": mean_instant,
        "min_gain_instant": low_instant,
        **_timing(headline, recorded_must),
        "seconds": round(seconds, 1),
        "hparams": overrides,
        "ablations": [r.to_dict() for r in results if r.ablation is not None],
    }


def _threads(count: int) -> None:
    torch.set_num_threads(count)


@dataclass(frozen=True)
class Plan:
    """What one worker process runs on a case (everything crosses processes by value)."""

    name: str
    train_images: int
    work: Path
    test_images: int
    values: dict[str, Any]
    dump: Path | None
    must: bool
    instant: dict[str, Any] | None


def _run_named(plan: Plan) -> dict[str, Any]:
    """`run_case` and `run_instant` in a worker process, by name (a sampler does not cross processes)."""
    case = next(c for c in CASES if c.name == plan.name)
    case = Case(**{**case.__dict__, "train_images": plan.train_images})
    values = plan.values
    if plan.must:
        config = MustConfig.from_dict(values) if values else None
        result = run_case(case, plan.work, plan.test_images, config, plan.dump)
    if plan.instant is not None:
        score, zero_shot = run_instant(
            case, plan.work, plan.test_images, InstantConfig.from_dict(plan.instant)
        )
        if not plan.must:
            result = Result(case, zero_shot, None, None, None, None, None, {})
        result.instant = score
    return {f.name: getattr(result, f.name) for f in fields(Result) if f.name != "case"}


def _size(case: Case) -> int:
    return case.train_images * (3 if case.model == "glyphs" else 2)  # glyph CLIP steps cost ~1.5x


def _few_label_named(
    name: str, train_images: int, work: Path, test_images: int, must: bool
) -> dict[str, Any]:
    case = next(c for c in CASES if c.name == name)
    case = Case(**{**case.__dict__, "train_images": train_images})
    return few_label.run_few_label(case, work / name, test_images, MODELS[case.model], must)


def few_label_main(args: argparse.Namespace) -> None:
    """The few-label study (bench.few_label): its table, then its JSON line."""
    names = args.cases or list(few_label.CASES)
    chosen = _selected(argparse.Namespace(**{**vars(args), "cases": names}))
    began = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="must-few-label-") as tmp,
        ProcessPoolExecutor(args.jobs, spawn, initializer=_threads, initargs=(threads,)) as pool,
    ):
        futures = [
            pool.submit(
                _few_label_named, c.name, c.train_images, Path(tmp), args.test_images, args.few_label_must
            )
            for c in chosen
        ]
        results = [f.result() for f in futures]
    few_label.print_table(results, RECORDED_MUST_SERVED)
    summary = {
        "few_label": results,
        "must_no_labels": {r["case"]: RECORDED_MUST_SERVED[r["case"]] for r in results},
        "must_no_labels_source": RECORDED_SOURCE,
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(summary))


def main() -> None:
    args = _parser().parse_args()
    if args.few_label:
        few_label_main(args)
        return
    overrides = dict(args.hparams)
    if args.steps:
        overrides |= {"total_steps": args.steps, "guard_images": 64}
    if overrides:
        print(f"NOT THE DEFAULTS (smoke run or development): {overrides}", file=sys.stderr)
    if args.instant_only and (args.ablations or args.dump or overrides):
        raise SystemExit(
            "--instant-only runs no MUST: --ablations, --dump, --steps and --hparams do not apply"
        )
    if args.instant_hparams:
        print(f"NOT THE FROZEN INSTANT SETTINGS (development): {args.instant_hparams}", file=sys.stderr)
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
                Plan(
                    case.name,
                    case.train_images,
                    Path(tmp) / (ablation or "defaults").replace(" ", "-"),
                    args.test_images,
                    values,
                    args.dump if not ablation else None,
                    must=not args.instant_only,
                    instant=None if ablation else args.instant_hparams,
                ),
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
    print(json.dumps(_summary(results, time.perf_counter() - began, overrides, args.instant_only)))


if __name__ == "__main__":
    main()
