"""The adaptation request schema, checked without the HTTP layer."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from services.must.config import MustConfig
from services.schemas.jobs import HPARAM_NAMES, INSTANT_HPARAM_NAMES, AdaptationCreate, TrainJobMessage

BASE: dict[str, Any] = {"class_names": ["cat", "dog"], "dataset": {"uri": "s3://my-images/unlabeled/"}}


def test_hparam_names_match_the_engine_config() -> None:
    # The API cannot import the engine (it would load torch), so the names are kept twice.
    assert set(MustConfig.__dataclass_fields__) == HPARAM_NAMES


def test_valid_request_is_normalised() -> None:
    request = AdaptationCreate.model_validate(
        BASE | {"class_names": [" cat", "dog "], "hparams": {"lr": 1, "grad_clip": None, "precision": "bf16"}}
    )

    assert request.class_names == ["cat", "dog"]
    assert request.model.arch == "ViT-B-32"
    assert request.model.pretrained == "openai"
    assert request.hparams == {"lr": 1.0, "grad_clip": None, "precision": "bf16"}


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"hparams": {"batch_size": True}}, "batch_size: Input should be a valid integer"),
        ({"hparams": {"threshold_mode": "fixed"}}, "threshold_mode 'fixed' needs a threshold"),
        (
            {"model": {"arch": "ViT-B-32", "pretrained": "openai", "checkpoint": "s3://weights/ckpt.pt"}},
            "not both",
        ),
        ({"model": {"pretrained": "openai"}}, "model needs `arch`"),
        ({"class_names": ["x" * 300, "dog"]}, "at most 256 characters"),
        ({"templates": []}, "at least 1 item"),
        ({"eval": {"uri": "http://example.com/eval"}}, "unsupported storage scheme 'http'"),
    ],
)
def test_invalid_request_says_what_to_fix(change: dict[str, Any], hint: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(hint)):
        AdaptationCreate.model_validate(BASE | change)


def test_custom_config_with_checkpoint_is_accepted() -> None:
    model = {"config": "file:///models/custom.json", "checkpoint": "s3://weights/custom.safetensors"}

    request = AdaptationCreate.model_validate(BASE | {"model": model})

    assert (request.model.arch, request.model.checkpoint) == (None, "s3://weights/custom.safetensors")


def test_train_job_message_round_trips_as_json() -> None:
    message = TrainJobMessage(job_id="0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10")

    assert TrainJobMessage.model_validate_json(message.model_dump_json()) == message


def test_method_defaults_to_must_and_instant_takes_its_own_hparams() -> None:
    assert AdaptationCreate.model_validate(BASE).method == "must"
    request = AdaptationCreate.model_validate(BASE | {"method": "instant", "hparams": {"seed": 3}})
    assert (request.method, request.hparams, request.warm_start) == ("instant", {"seed": 3}, None)
    warm = AdaptationCreate.model_validate(BASE | {"warm_start": "instant"})
    assert (warm.method, warm.warm_start) == ("must", "instant")
    assert INSTANT_HPARAM_NAMES < HPARAM_NAMES


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"method": "instant", "hparams": {"total_steps": 10}}, "'total_steps' train MUST and do not apply"),
        ({"method": "instant", "warm_start": "instant"}, "warm_start applies to method 'must' only"),
        ({"method": "tent"}, "Input should be 'must' or 'instant'"),
        ({"warm_start": "zero_shot"}, "Input should be 'instant'"),
    ],
)
def test_method_fields_that_cannot_apply_are_refused(change: dict[str, Any], hint: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(hint)):
        AdaptationCreate.model_validate(BASE | change)
