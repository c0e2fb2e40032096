"""The `must` command where no service is needed: arguments, unreachable services, upload plans."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from client.cli import EXIT_UNREACHABLE, EXIT_USAGE, build_parser, main
from client.http import MustClient, ServiceUnreachable
from client.progress import describe_job, format_seconds, job_row
from client.upload import IMAGE_EXTENSIONS, plan_upload
from services.schemas.jobs import AdaptationPublic


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_adapt_arguments_become_a_request(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("bolt\n nut \n\nwasher\n")
    args = build_parser().parse_args(
        ["adapt", "s3://b/p/", "--classes", str(classes), "--model", "ViT-B-16", "--pretrained", "openai"]
        + ["--steps", "500", "--hparams", '{"mask_ratio": 0.4}', "--wait"]
    )

    assert args.classes == ["bolt", "nut", "washer"]
    assert args.wait
    assert args.hparams == {"mask_ratio": 0.4}
    assert build_parser().parse_args(["adapt", "s3://b/", "--classes", "a, b,c"]).classes == ["a", "b", "c"]
    instant = build_parser().parse_args(["adapt", "s3://b/", "--classes", "a,b", "--method", "instant"])
    assert (instant.method, instant.warm_start) == ("instant", None)
    warm = build_parser().parse_args(["adapt", "s3://b/", "--classes", "a,b", "--warm-start", "instant"])
    assert (warm.method, warm.warm_start) == (None, "instant")


@pytest.mark.parametrize(
    "argv",
    [
        ["adapt", "s3://b/"],  # --classes is required
        ["adapt", "s3://b/", "--classes", "a,b", "--hparams", "{not json"],
        ["adapt", "s3://b/", "--classes", "a,b", "--hparams", "[1, 2]"],
        ["list", "--status", "sleeping"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)

    assert stopped.value.code == EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_an_unreachable_control_api_is_named_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"

    code = main(["--api-url", url, "list"])

    err = capsys.readouterr().err
    assert code == EXIT_UNREACHABLE
    assert f"cannot reach the control API at {url}" in err
    assert "MUST_API_URL" in err


def test_an_unreachable_inference_service_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"not decoded before sending")
    url = f"http://127.0.0.1:{closed_port()}"

    code = main(["--inference-url", url, "predict", "some-id", str(image)])

    err = capsys.readouterr().err
    assert code == EXIT_UNREACHABLE
    assert f"cannot reach the inference service at {url}" in err
    assert "MUST_INFERENCE_URL" in err


def test_the_client_raises_a_typed_error_for_an_unreachable_service() -> None:
    with MustClient(f"http://127.0.0.1:{closed_port()}") as must, pytest.raises(ServiceUnreachable) as caught:
        must.list_adaptations()

    assert caught.value.service == "control API"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "some-id"], "at least one image"),
        (["predict", "--zero-shot", "a.png"], "--zero-shot needs --classes"),
        (["predict", "some-id", "s3://b/p/", "s3://b/q/", "--out", "r.jsonl"], "one s3:// prefix"),
        (["predict", "--zero-shot", "s3://b/p/", "--out", "r.jsonl"], "no --zero-shot"),
    ],
)
def test_predict_usage_errors_exit_2_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["--api-url", "http://127.0.0.1:9", "--inference-url", "http://127.0.0.1:9", *argv])
        == EXIT_USAGE
    )
    assert message in capsys.readouterr().err


def test_missing_local_images_are_refused_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--inference-url", "http://127.0.0.1:9", "predict", "some-id", "/no/such/file.png"])

    assert code == EXIT_USAGE
    assert "no such file: /no/such/file.png" in capsys.readouterr().err


def test_upload_plan_keeps_relative_paths_and_leaves_out_non_images(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("cats/a.JPG", "cats/b.png", "c.webp", "notes.txt", ".hidden/d.png", "cats/.e.png"):
        (tmp_path / name).write_bytes(b"x")

    plan = plan_upload(tmp_path, "s3://must-datasets/parts")

    assert plan.bucket == "must-datasets"
    assert [key for _, key in plan.items] == ["parts/c.webp", "parts/cats/a.JPG", "parts/cats/b.png"]
    assert plan.skipped == 1
    with pytest.raises(ValueError, match="not an s3:// URI"):
        plan_upload(tmp_path, "file:///tmp/x")


def test_upload_knows_the_same_image_extensions_as_the_worker() -> None:
    # services.must.data loads torch, so the client keeps its own copy; check it in a subprocess.
    code = "from services.must.data import IMAGE_EXTENSIONS as E; print(','.join(sorted(E)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().split(",") == sorted(IMAGE_EXTENSIONS)


def test_job_summaries_read_well() -> None:
    job = AdaptationPublic.model_validate(
        {
            "id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10",
            "status": "failed",
            "phase": "training",
            "created_at": datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
            "progress": {"step": 500, "total_steps": 2000, "images_per_sec": 210.5, "eta_seconds": 1425},
            "latest_metrics": {"loss": 1.92, "confident_fraction": 0.61},
            "images_used": 48210,
            "images_skipped": 12,
            "skipped_reasons": {"not_an_image": 9, "unreadable": 3},
            "error": {"type": "DatasetError", "message": "the bucket went away"},
            "request": {},
        }
    )

    text = describe_job(job)

    assert "status    failed" in text
    assert "500/2000 steps (25%), 210.5 img/s" in text
    assert "ETA" not in text  # only a running job has one
    assert "48210 used, 12 skipped (not_an_image 9, unreadable 3)" in text
    assert "error     DatasetError: the bucket went away" in text
    assert job_row(job) == (job.id, "failed", "-", "500/2000", "2026-11-25 10:00:00")
    assert format_seconds(3723) == "1:02:03"
    assert format_seconds(None) == "?"


def test_status_says_what_a_job_serves_and_why() -> None:
    score = {"step": 0, "gain_zs_space": 0.4, "gain_own_space": 0.4, "zero_shot_in_own_space": 0.4}
    job = AdaptationPublic.model_validate(
        {
            "id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10",
            "status": "succeeded",
            "created_at": datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
            "progress": {"step": 900, "total_steps": 900},
            "served": "zero_shot",
            "outcome": {
                "served": "zero_shot",
                "reason": "no adapted classifier beat zero-shot by the guard's criterion",
                "candidates": [
                    {"name": "zero_shot", "margin": 0.0, "balance": 0.9, **score},
                    {"name": "teacher", "margin": -0.021, "balance": 0.8, **score, "step": 900},
                ],
                "views": {"crop_min": 0.85, "rand_augment": "rand-n1-m3", "hflip": False, "agreement": 0.81},
                "threshold": [0.6],
            },
            "request": {},
        }
    )

    text = describe_job(job)

    assert "serves    zero_shot" in text
    assert "why       no adapted classifier beat zero-shot" in text
    assert "guard     margin over zero-shot: zero_shot +0.000, teacher -0.021" in text
    assert "views     crop >= 0.85, rand-n1-m3, no flip, zero-shot agreement 0.81" in text


def test_status_names_the_instant_method_and_a_warm_start() -> None:
    score = {"step": 0, "gain_zs_space": 0.4, "gain_own_space": 0.4, "zero_shot_in_own_space": 0.4}
    candidates = [{"name": "zero_shot", "margin": 0.0, "balance": 0.9, **score}]
    base = {
        "id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10",
        "status": "succeeded",
        "created_at": datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
        "progress": {"step": 1, "total_steps": 1},
        "request": {},
    }
    outcome = {"served": "instant", "reason": "instant beats zero-shot", "candidates": candidates}
    instant = AdaptationPublic.model_validate(base | {"outcome": outcome | {"method": "instant"}})
    warm = {"method": "instant", "used": False, "reason": "no adapted classifier beat zero-shot"}
    must = AdaptationPublic.model_validate(base | {"outcome": outcome | {"warm_start": warm}})

    assert "method    instant" in describe_job(instant)
    assert "warm start" not in describe_job(instant)
    assert "instant head not used: no adapted classifier beat zero-shot" in describe_job(must)
    assert "method" not in describe_job(must)
