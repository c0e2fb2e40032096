"""Command-line entry points: `must-adapt` (train on a local folder) and `must-predict`.

must-adapt --images DIR --classes cat,dog,bird --model ViT-B-32 --checkpoint clip.safetensors --out run/
must-predict --model-dir run/classifier photo1.jpg photo2.png more-photos/

On several GPUs, the same entry point under torchrun (one process per GPU; `--batch-size` is the
global batch, split evenly between the processes; rank 0 writes checkpoints, metrics and the
classifier):

torchrun --nproc-per-node 4 -m services.must.cli --images DIR --classes cat,dog --out run/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

# Before anything imports torch: OpenMP reads its wait policy once, when torch loads it.
import services.must._omp  # noqa: F401
from services.must import distributed
from services.must.adapt import adapt, list_images
from services.must.batch import DEFAULT_BATCH, BatchOptions, classify_stream
from services.must.config import MustConfig
from services.must.data import IMAGE_EXTENSIONS, ImageLoadError
from services.must.errors import ConfigError, MustError
from services.must.export import load_classifier
from services.must.instant import FolderFeatureCache, start_instant
from services.must.loading import ModelSpec
from services.must.trainer import StepMetrics, TrainerHooks, describe


def _classes(value: str) -> list[str]:
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [c.strip() for c in value.split(",")]


def _templates(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"templates file {value!r} does not exist")
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]


def adapt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="must-adapt", description="Adapt a CLIP to unlabeled images with MUST.")
    p.add_argument(
        "--images", required=True, type=Path, help="folder of unlabeled images (searched recursively)"
    )
    p.add_argument(
        "--classes", required=True, help="comma-separated class names, or a file with one per line"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoints/ and classifier/)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture name (default ViT-B-32)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag, e.g. openai (needs the hub)")
    p.add_argument("--checkpoint", default=None, help="local CLIP weights file (.safetensors, .pt, .bin)")
    p.add_argument(
        "--model-config", default=None, help="custom open_clip model config JSON (with --checkpoint)"
    )
    p.add_argument("--templates", default=None, help="file of prompt templates, one per line, each with {}")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: derived from data size)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-5 x batch/256)")
    p.add_argument(
        "--hparams", default=None, help="JSON object of other hyperparameters, e.g. '{\"mask_ratio\": 0.5}'"
    )
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument(
        "--method",
        choices=["must", "instant"],
        default="must",
        help="must (trains the image tower) or instant (a training-free head fit on the images' "
        "features, cached in OUT/features)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace) -> MustConfig:
    try:
        values = json.loads(args.hparams) if args.hparams else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--hparams is not valid JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError("--hparams must be a JSON object")
    for key, value in (("total_steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)):
        if value is not None:
            values[key] = value
    return MustConfig.from_dict(values)


def _spec(args: argparse.Namespace) -> ModelSpec:
    if args.model_config:
        return ModelSpec(config=args.model_config, checkpoint=args.checkpoint)
    return ModelSpec(arch=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)


class ProgressBar:
    """A tqdm bar fed by the trainer's on_step callback."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: tqdm | None = None

    def __call__(self, m: StepMetrics) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=m.total_steps, initial=m.step - 1, unit="step", dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{m.losses.get('loss', m.losses.get('distill', 0.0)):.3f}",
            conf=f"{m.stats.get('confident_fraction', 0):.2f}",
            img_s=f"{m.images_per_sec:.0f}",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _instant(args: argparse.Namespace, on_step: Callable[[StepMetrics], None], bar: ProgressBar) -> int:
    """The instant method on the folder; its MUST-only options are refused, not ignored."""
    if args.steps is not None or args.batch_size is not None or args.lr is not None:
        raise ConfigError("--steps, --batch-size and --lr train MUST and do not apply to --method instant")
    paths, skipped = list_images(args.images, args.max_images)
    run = start_instant(
        paths,
        _classes(args.classes),
        model=_spec(args),
        templates=_templates(args.templates),
        config=_config(args),
        device=args.device,
        cache=FolderFeatureCache(args.out / "features"),
    )
    result = run.train(hooks=TrainerHooks(on_step=on_step))
    manifest = run.export(args.out / "classifier", result, skipped)
    bar.close()
    print(f"instant fit on {len(paths)} images ({skipped.total} skipped); serves {manifest.network}")
    print(f"classifier written to {args.out / 'classifier'}")
    return 0


def adapt_main(argv: Sequence[str] | None = None) -> int:
    args = adapt_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Under torchrun: join the process group; only rank 0 reports (the hooks run on rank 0 only).
    main = distributed.init_from_env().is_main
    try:
        return _adapt(args, quiet=args.quiet or not main) if main else _adapt_quietly(args)
    finally:
        distributed.shutdown()


def _adapt_quietly(args: argparse.Namespace) -> int:
    """A rank other than 0: trains its share, writes nothing."""
    try:
        adapt(
            args.images,
            _classes(args.classes),
            out_dir=args.out,
            model=_spec(args),
            templates=_templates(args.templates),
            config=_config(args),
            device=args.device,
            max_images=args.max_images,
        )
    except MustError as exc:
        print(f"must-adapt: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _adapt(args: argparse.Namespace, quiet: bool) -> int:
    bar = ProgressBar(quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "metrics.jsonl", "a") as metrics_file:

        def on_step(m: StepMetrics) -> None:
            metrics_file.write(json.dumps(describe(m)) + "\n")
            bar(m)

        try:
            if args.method == "instant":
                return _instant(args, on_step, bar)
            result = adapt(
                args.images,
                _classes(args.classes),
                out_dir=args.out,
                model=_spec(args),
                templates=_templates(args.templates),
                config=_config(args),
                device=args.device,
                hooks=TrainerHooks(on_step=on_step),
                max_images=args.max_images,
            )
        except MustError as exc:
            bar.close()
            print(f"must-adapt: error: {exc}", file=sys.stderr)
            return 2
    bar.close()
    print(
        f"trained {result.fit.end_step} steps on {result.num_images} images "
        f"({result.skipped.total} skipped: {result.skipped.counts})"
    )
    print(f"classifier written to {result.classifier_dir}")
    return 0


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="must-predict",
        description="Classify images with an exported classifier: one JSON line per image.",
    )
    p.add_argument("--model-dir", required=True, type=Path, help="an exported classifier folder")
    p.add_argument(
        "images", nargs="+", type=Path, metavar="PATH", help="image files, or folders to read (recursively)"
    )
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--min-probability",
        type=float,
        default=None,
        help="abstain (label null, abstained true) when the top probability is below this",
    )
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--device", default="cpu")
    return p


def image_paths(paths: Sequence[Path]) -> Iterator[Path]:
    """The given files as they are, and each folder's image files (by extension), sorted, recursively."""
    for path in paths:
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            yield from sorted(found)
        else:
            yield path


def _read(paths: Iterable[Path]) -> Iterator[tuple[str, bytes | ImageLoadError]]:
    for path in paths:
        try:
            yield str(path), path.read_bytes()
        except OSError as exc:
            yield str(path), ImageLoadError("unreadable", exc.strerror or type(exc).__name__)


def predict_main(argv: Sequence[str] | None = None) -> int:
    args = predict_parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        print("must-predict: error: --top-k and --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.min_probability is not None and not 0.0 <= args.min_probability <= 1.0:
        print("must-predict: error: --min-probability must be between 0 and 1", file=sys.stderr)
        return 2
    try:
        classifier = load_classifier(args.model_dir, device=args.device)
    except MustError as exc:
        print(f"must-predict: error: {exc}", file=sys.stderr)
        return 2
    options = BatchOptions(top_k=args.top_k, min_probability=args.min_probability, batch_size=args.batch_size)
    status, seen = 0, 0
    for record in classify_stream(classifier, _read(image_paths(args.images)), options):
        seen += 1
        status = 1 if "error" in record else status
        print(json.dumps(record), flush=True)
    if seen == 0:
        print("must-predict: error: no image files found", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":  # `torchrun ... -m services.must.cli`
    sys.exit(adapt_main())
