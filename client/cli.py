"""`must`: submit, watch, list and cancel adaptation jobs, classify images, upload datasets.

    must upload photos/ s3://must-datasets/parts/
    must adapt s3://must-datasets/parts/ --classes bolt,nut,washer --wait
    must predict 0b6f3c1e-... photo.jpg s3://must-datasets/parts/img-001.png
    must predict 0b6f3c1e-... s3://must-datasets/incoming/ --out results.jsonl   # a batch run
    must predict --zero-shot --classes bolt,nut,washer photo.jpg                 # the baseline
    must metrics 0b6f3c1e-...      # eval-set scores and metric history
    must logs 0b6f3c1e-...         # the worker's lines for the job

The services' addresses and the API key come from options or the environment:
MUST_API_URL (default http://127.0.0.1:8000), MUST_INFERENCE_URL (default
http://127.0.0.1:8001) and MUST_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client.http import (
    DEFAULT_API_URL,
    DEFAULT_INFERENCE_URL,
    ApiError,
    MustClient,
    MustClientError,
    ServiceUnreachable,
    Unauthorized,
)
from client.progress import (
    CountProgress,
    JobProgressBar,
    describe_job,
    evaluation_table,
    job_row,
    metrics_table,
)
from client.upload import plan_upload, upload
from services.jobs.states import JobStatus
from services.schemas.predictions import PredictionPublic

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job failed or was cancelled
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_REFUSED = 3  # the service answered with an error (4xx/5xx)
EXIT_UNREACHABLE = 4  # a service could not be reached

EPILOG = """\
exit status: 0 success, 1 the job failed or was cancelled, 2 bad arguments,
3 the service refused the request, 4 a service could not be reached."""


def _class_names(value: str) -> list[str]:
    """Comma-separated names, or a file with one name per line."""
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"total_steps\": 2000}'")
    return parsed


def _templates(value: str) -> list[str]:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"templates file {value!r} does not exist")
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]


def _add_adapt(commands: Any) -> None:
    p = commands.add_parser("adapt", help="submit an adaptation job", epilog=EPILOG)
    p.add_argument("dataset", help="s3://bucket/prefix/ of unlabeled images")
    p.add_argument(
        "--classes", required=True, type=_class_names, help="comma-separated, or a file, one per line"
    )
    p.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32 (default: the service's)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, e.g. openai")
    p.add_argument("--checkpoint", help="CLIP weights as s3:// URI")
    p.add_argument("--model-config", help="custom open_clip model config JSON as s3:// URI")
    p.add_argument(
        "--templates", type=_templates, help="file of prompt templates, one per line, each with {}"
    )
    p.add_argument("--steps", type=int, help="training steps (default: derived from the number of images)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--hparams", type=_json_object, help="other hyperparameters as a JSON object")
    p.add_argument(
        "--method",
        choices=["must", "instant"],
        help="must (default: trains, hours) or instant (training-free head fit, seconds to minutes)",
    )
    p.add_argument(
        "--warm-start", choices=["instant"], help="MUST only: start from the instant method's head"
    )
    p.add_argument("--max-images", type=int, help="use at most this many images")
    p.add_argument(
        "--eval",
        dest="eval_uri",
        help="labelled set (folder per class, or a .csv/.jsonl manifest of key,label); only reported",
    )
    p.add_argument(
        "--descriptions",
        type=_json_object,
        help='prompt text per class as a JSON object, e.g. \'{"bolt": "a threaded metal fastener"}\'',
    )
    p.add_argument(
        "--wait", action="store_true", help="show progress until the job ends; non-zero exit if it fails"
    )
    p.add_argument("--poll", type=float, default=2.0, help="seconds between progress checks (default 2)")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.add_argument("--name", help="a name to find the job by (must list --name)")
    p.add_argument("--tag", dest="tags", action="append", metavar="TAG", help="a tag (repeat for more)")
    p.set_defaults(run=cmd_adapt)


def _add_predict(commands: Any) -> None:
    p = commands.add_parser(
        "predict",
        help="classify images (files, s3:// images, or with --out every image under a prefix)",
        usage="must predict [options] ID IMAGE [IMAGE ...]\n"
        "       must predict [options] --zero-shot --classes NAMES IMAGE [IMAGE ...]\n"
        "       must predict [options] ID s3://bucket/prefix/ --out results.jsonl",
        epilog=EPILOG,
    )
    p.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="a succeeded adaptation's id, then local files or s3:// URIs (with --zero-shot: images only)",
    )
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--min-probability", type=float, help="abstain (label null) below this top probability")
    p.add_argument("--json", action="store_true")
    batch = p.add_argument_group("batch mode (a run on a worker over a whole prefix)")
    batch.add_argument(
        "--out", type=Path, help="classify every image under ONE s3:// prefix; save the JSONL here"
    )
    batch.add_argument("--max-images", type=int, help="classify at most this many")
    batch.add_argument("--poll", type=float, default=2.0, help="seconds between progress checks (default 2)")
    zero = p.add_argument_group("zero-shot baseline (no adaptation: the CLIP and the class names)")
    zero.add_argument("--zero-shot", action="store_true", help="classify with the zero-shot baseline")
    zero.add_argument("--classes", type=_class_names, help="comma-separated, or a file, one per line")
    zero.add_argument("--model", help="open_clip architecture (default: the service's)")
    zero.add_argument("--pretrained", help="open_clip pretrained tag, e.g. openai")
    zero.add_argument("--checkpoint", help="CLIP weights as s3:// URI (or a file the service may read)")
    zero.add_argument("--model-config", help="custom open_clip model config JSON as s3:// URI")
    zero.add_argument("--templates", type=_templates, help="file of prompt templates, one per line")
    p.set_defaults(run=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    """The `must` argument parser and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="must", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("--api-url", default=os.environ.get("MUST_API_URL", DEFAULT_API_URL))
    parser.add_argument(
        "--inference-url", default=os.environ.get("MUST_INFERENCE_URL", DEFAULT_INFERENCE_URL)
    )
    parser.add_argument("--api-key", default=os.environ.get("MUST_API_KEY"), help="default: $MUST_API_KEY")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_adapt(commands)

    p = commands.add_parser("status", help="show one job (the newest if no id is given)")
    p.add_argument("id", nargs="?")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends")
    p.add_argument("--poll", type=float, default=2.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("list", help="list jobs, newest first")
    p.add_argument("--status", choices=[s.value for s in JobStatus])
    p.add_argument("--name", help="only jobs with this exact name")
    p.add_argument("--tag", help="only jobs with this tag")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_list)

    p = commands.add_parser("metrics", help="a job's eval-set scores and metric history")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_metrics)

    p = commands.add_parser("logs", help="the worker's log lines for a job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_logs)

    p = commands.add_parser("cancel", help="cancel a job")
    p.add_argument("id")
    p.set_defaults(run=cmd_cancel)

    p = commands.add_parser("delete", help="delete a job with its classifier and checkpoints")
    p.add_argument("id")
    p.set_defaults(run=cmd_delete)

    p = commands.add_parser("download", help="download a succeeded job's classifier into a folder")
    p.add_argument("id")
    p.add_argument("folder", type=Path)
    p.add_argument(
        "--via-api", action="store_true", help="stream through the control API, not from the object store"
    )
    p.set_defaults(run=cmd_download)

    p = commands.add_parser(
        "export", help="download a job's classifier and convert it (ONNX) on this machine"
    )
    p.add_argument("id")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="only onnx for now (the default)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: ID.onnx)")
    p.add_argument("--via-api", action="store_true", help="download through the control API")
    p.set_defaults(run=cmd_export)

    _add_predict(commands)

    p = commands.add_parser("upload", help="copy a folder's images to s3://bucket/prefix/")
    p.add_argument("folder", type=Path)
    p.add_argument("uri", help="s3://bucket/prefix/")
    p.add_argument("--endpoint-url", default=None, help="S3 server, e.g. http://localhost:9000 for MinIO")
    p.add_argument("--workers", type=int, default=8)
    p.set_defaults(run=cmd_upload)
    return parser


def _model(args: argparse.Namespace) -> dict[str, str] | None:
    fields = {"arch": args.model, "pretrained": args.pretrained}
    fields |= {"checkpoint": args.checkpoint, "config": args.model_config}
    chosen = {key: value for key, value in fields.items() if value}
    return chosen or None


def _hparams(args: argparse.Namespace) -> dict[str, Any] | None:
    hparams = dict(args.hparams or {})
    if args.steps is not None:
        hparams["total_steps"] = args.steps
    if args.batch_size is not None:
        hparams["batch_size"] = args.batch_size
    return hparams or None


def _watch(must: MustClient, job_id: str, poll: float, as_json: bool) -> int:
    """Follow the job with a progress bar until it ends; the exit status its outcome deserves."""
    with JobProgressBar(enabled=not as_json) as bar:
        job = must.wait(job_id, poll_seconds=poll, on_update=bar.update)
    print(job.model_dump_json(indent=2) if as_json else describe_job(job))
    return EXIT_OK if job.status == JobStatus.SUCCEEDED else EXIT_JOB_FAILED


def cmd_adapt(must: MustClient, args: argparse.Namespace) -> int:
    """Submit the job; with --wait, follow it to the end."""
    job = must.adapt(
        args.dataset,
        args.classes,
        model=_model(args),
        templates=args.templates,
        hparams=_hparams(args),
        max_images=args.max_images,
        eval_uri=args.eval_uri,
        class_descriptions=args.descriptions,
        name=args.name,
        tags=args.tags,
        method=args.method,
        warm_start=args.warm_start,
    )
    if args.wait:
        print(f"submitted adaptation {job.id}", file=sys.stderr)
        return _watch(must, job.id, args.poll, args.json)
    print(job.model_dump_json(indent=2) if args.json else job.id)
    return EXIT_OK


def cmd_status(must: MustClient, args: argparse.Namespace) -> int:
    """Describe one job; without an id, the newest."""
    job_id = args.id
    if job_id is None:
        page = must.list_adaptations(limit=1)
        if not page.items:
            print("no adaptation jobs yet", file=sys.stderr)
            return EXIT_OK
        job_id = page.items[0].id
    if args.wait:
        return _watch(must, job_id, args.poll, args.json)
    job = must.get(job_id)
    print(job.model_dump_json(indent=2) if args.json else describe_job(job))
    return EXIT_OK


def cmd_list(must: MustClient, args: argparse.Namespace) -> int:
    """A table of jobs, newest first."""
    page = must.list_adaptations(status=args.status, limit=args.limit, name=args.name, tag=args.tag)
    if args.json:
        print(page.model_dump_json(indent=2))
        return EXIT_OK
    rows = [("ID", "STATUS", "PHASE", "PROGRESS", "CREATED")] + [job_row(job) for job in page.items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if page.total > len(page.items):
        print(f"({len(page.items)} of {page.total}; --limit shows more)", file=sys.stderr)
    return EXIT_OK


def cmd_metrics(must: MustClient, args: argparse.Namespace) -> int:
    """The eval-set table (when the job has one) and the metric history table."""
    job = must.get(args.id)
    page = must.metrics(job.id, limit=10_000)
    if args.json:
        evaluation = job.evaluation.model_dump(mode="json") if job.evaluation else None
        items = [item.model_dump(mode="json") for item in page.items]
        print(json.dumps({"adaptation_id": job.id, "evaluation": evaluation, "items": items}, indent=2))
        return EXIT_OK
    if job.evaluation:
        print(evaluation_table(job.evaluation) + "\n")
    elif job.request.get("eval"):
        print(f"eval set: no scores yet (the job is {job.status.value})\n")
    print(metrics_table(page))
    return EXIT_OK


def cmd_logs(must: MustClient, args: argparse.Namespace) -> int:
    """The worker's lines for the job, oldest first."""
    for line in must.logs(args.id):
        if args.json:
            print(line.model_dump_json())
        else:
            print(f"{line.time:%Y-%m-%d %H:%M:%S} {line.level:<7} {line.logger}: {line.message}")
    return EXIT_OK


def cmd_cancel(must: MustClient, args: argparse.Namespace) -> int:
    """Ask the job to stop."""
    job = must.cancel(args.id)
    state = (
        "cancelled" if job.status == JobStatus.CANCELLED else "cancel requested; it stops at its next step"
    )
    print(f"{job.id}: {state}")
    return EXIT_OK


def cmd_delete(must: MustClient, args: argparse.Namespace) -> int:
    """Delete the job and everything it stored."""
    must.delete(args.id)
    print(f"{args.id}: deleted")
    return EXIT_OK


def cmd_download(must: MustClient, args: argparse.Namespace) -> int:
    """Download the classifier's files, each checked against its sha256."""
    info = must.download(args.id, args.folder, via_api=args.via_api)
    for file in info.files:
        print(f"{args.folder / file.name}  {file.size} bytes  sha256 {file.sha256}")
    return EXIT_OK


def cmd_export(must: MustClient, args: argparse.Namespace) -> int:
    """Download the classifier into a temporary folder and convert it here (needs torch and onnx)."""
    try:
        from services.must.onnx_export import export_onnx_from_dir
    except ImportError as exc:
        raise MustClientError(
            f"export runs the model on this machine and needs torch and onnx ({exc.name} is missing): "
            "pip install -e '.[ml,onnx]'"
        ) from None
    out = args.out or Path(f"{args.id}.{args.format}")
    with tempfile.TemporaryDirectory(prefix="must-export-") as folder:
        info = must.download(args.id, folder, via_api=args.via_api)
        export_onnx_from_dir(Path(folder), out)
    print(f"{out}: ONNX classifier of adaptation {info.adaptation_id} (weights sha256 {info.sha256})")
    return EXIT_OK


def _format_predictions(name: str, result: dict[str, Any]) -> str:
    if result.get("error"):
        return f"{name}: rejected ({result['error']['reason']}): {result['error']['message']}"
    labels = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in result["predictions"])
    return f"{name}: {'abstained; ' if result.get('abstained') else ''}{labels}"


def _zero_shot_fields(args: argparse.Namespace) -> dict[str, str]:
    if not args.classes:
        raise MustClientError("--zero-shot needs --classes (at least two class names)")
    fields = dict(_model(args) or {}) | {"class_names": json.dumps(args.classes)}
    if args.templates:
        fields["templates"] = json.dumps(args.templates)
    return fields


def _split_targets(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(adaptation id or None for --zero-shot, the images)."""
    if args.zero_shot:
        return None, list(args.targets)
    if len(args.targets) < 2:
        raise MustClientError("give an adaptation id and at least one image (or --zero-shot and images)")
    return args.targets[0], list(args.targets[1:])


def cmd_predict(must: MustClient, args: argparse.Namespace) -> int:
    """Classify local files (one upload) and s3:// images (one request each), in the order given;
    with --out, run a batch prediction over one prefix on a worker and save its JSONL."""
    adaptation_id, images = _split_targets(args)
    if args.out is not None:
        if adaptation_id is None or len(images) != 1:
            raise MustClientError("--out takes an adaptation id and one s3:// prefix (no --zero-shot)")
        return _predict_prefix(must, adaptation_id, images[0], args)
    zero_shot = _zero_shot_fields(args) if args.zero_shot else None
    options: dict[str, Any] = {
        "top_k": args.top_k,
        "zero_shot": zero_shot,
        "min_probability": args.min_probability,
    }
    local = [image for image in images if not image.startswith("s3://")]
    missing = [path for path in local if not Path(path).is_file()]
    if missing:
        raise MustClientError(f"no such file: {', '.join(missing)}")
    uploaded = iter(must.predict_files(adaptation_id, local, **options)) if local else iter(())
    keep = ("label", "abstained", "predictions", "error")
    for image in images:
        answer = (
            must.predict_url(adaptation_id, image, **options) if image.startswith("s3://") else next(uploaded)
        )
        result = {"image": image} | {key: answer.get(key) for key in keep}
        print(json.dumps(result) if args.json else _format_predictions(image, result))
    return EXIT_OK


def _predict_prefix(must: MustClient, adaptation_id: str, source: str, args: argparse.Namespace) -> int:
    """Queue a batch prediction run, follow it with plain progress lines, then save its JSONL."""
    run = must.start_prediction(
        adaptation_id,
        source,
        top_k=args.top_k,
        min_probability=args.min_probability,
        max_images=args.max_images,
    )
    print(f"prediction run {run.id} queued", file=sys.stderr)
    last: list[tuple[str, int]] = []

    def report(update: PredictionPublic) -> None:
        state = (update.status.value, update.images_done)
        if not last or last[-1] != state:
            last.append(state)
            print(f"prediction run {update.id}: {state[0]}, {state[1]} images", file=sys.stderr)

    run = must.wait_prediction(run.id, poll_seconds=args.poll, on_update=report)
    if run.status != JobStatus.SUCCEEDED:
        print(f"prediction run {run.id} {run.status.value}: {run.error_message}", file=sys.stderr)
        return EXIT_JOB_FAILED
    must.download_prediction_results(run, args.out)
    if args.json:
        print(run.model_dump_json(indent=2))
    else:
        print(
            f"{args.out}: {run.images_done} images ({run.images_failed} unusable, "
            f"{run.images_abstained} abstained), sha256 {run.results_sha256}"
        )
    return EXIT_OK


def cmd_upload(_: MustClient, args: argparse.Namespace) -> int:
    """Copy the folder's images into the bucket, keeping their relative paths under the prefix."""
    import boto3  # only this command needs it

    try:
        plan = plan_upload(args.folder, args.uri)
    except ValueError as exc:
        raise MustClientError(str(exc)) from None
    if not plan.items:
        raise MustClientError(f"no image files under {str(args.folder)!r}")
    s3 = boto3.client("s3", endpoint_url=args.endpoint_url)
    bar = CountProgress(len(plan.items), "file")
    try:
        count, unchanged = upload(plan, s3, workers=args.workers, on_done=lambda _: bar.update())
    finally:
        bar.close()
    notes = [f"{unchanged} already there with the same size and checksum"] if unchanged else []
    notes += [f"{plan.skipped} non-image files left out"] if plan.skipped else []
    print(f"uploaded {count} images to {args.uri}" + (f" ({'; '.join(notes)})" if notes else ""))
    return EXIT_OK


def _hint(exc: MustClientError, args: argparse.Namespace) -> str:
    """What to try next, for the errors people hit first."""
    if isinstance(exc, ServiceUnreachable):
        option = (
            "--api-url / MUST_API_URL"
            if exc.url == args.api_url.rstrip("/")
            else "--inference-url / MUST_INFERENCE_URL"
        )
        return f"is it running? set {option} to its address"
    if isinstance(exc, Unauthorized):
        return "set --api-key or MUST_API_KEY to one of the service's MUST_API_KEYS"
    return ""


def _exit_status(exc: Exception) -> int:
    if isinstance(exc, ServiceUnreachable):
        return EXIT_UNREACHABLE
    return EXIT_REFUSED if isinstance(exc, ApiError) else EXIT_USAGE


def _s3_errors() -> tuple[type[Exception], ...]:
    """boto3's errors, when boto3 is installed (only `upload` uses it)."""
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError, Boto3Error)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `must` command."""
    args = build_parser().parse_args(argv)
    run: Callable[[MustClient, argparse.Namespace], int] = args.run
    try:
        with MustClient(args.api_url, args.inference_url, api_key=args.api_key, timeout=args.timeout) as must:
            return run(must, args)
    except MustClientError as exc:
        hint = _hint(exc, args)
        print(f"must: error: {exc}" + (f"\n  ({hint})" if hint else ""), file=sys.stderr)
        return _exit_status(exc)
    except _s3_errors() as exc:
        print(f"must: error: S3 refused the upload: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("\nmust: stopped watching; the job goes on (see `must status`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
