"""Boundary models of adaptation jobs: the HTTP request and responses, and the queue message.

These import neither torch nor `services.must` (the API process must not load torch), so the
engine's hyperparameter names are kept here as a literal and a test checks them against
`services.must.config.MustConfig`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from services.errors import InvalidRequest
from services.jobs.states import JobPhase, JobStatus
from services.storage.uri import parse_uri

if TYPE_CHECKING:
    from services.db.models import Job, JobLogLine, JobMetric, JobPhaseSpan

MIN_CLASSES = 2
# Same limit as the engine's text head (services.must.classifier.MAX_CLASSES).
MAX_CLASSES = 10_000
# CLIP's tokenizer keeps 77 tokens per prompt; longer names would only be truncated.
MAX_CLASS_NAME_CHARS = 256
MAX_TEMPLATES = 256
# Step counts and other integers are stored in 32-bit database columns.
MAX_INT = 2**31 - 1
# open_clip architecture names and pretrained tags: no `:` or `/`, so no `hf-hub:` or `local-dir:`
# schema and no file path can be named through them.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"

_PositiveInt = Annotated[int, Field(strict=True, ge=1, le=MAX_INT)]
_NonNegativeInt = Annotated[int, Field(strict=True, ge=0, le=MAX_INT)]
_PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
_NonNegativeFloat = Annotated[float, Field(strict=True, ge=0)]
_UnitInterval = Annotated[float, Field(strict=True, ge=0, lt=1)]

# Every hyperparameter the engine accepts (MustConfig's fields) and the values it can take;
# None (where allowed) means "derive from the data set size", as in MustConfig.
HPARAM_TYPES: dict[str, Any] = {
    "total_steps": _PositiveInt | None,
    "batch_size": Annotated[int, Field(strict=True, ge=2, le=65_536)],
    "base_lr": _PositiveFloat,
    "lr": _PositiveFloat | None,
    "min_lr_ratio": Annotated[float, Field(strict=True, ge=0, le=1)],
    "warmup_steps": _NonNegativeInt | None,
    "weight_decay": _NonNegativeFloat,
    "layer_decay": Annotated[float, Field(strict=True, gt=0, le=1)],
    "grad_clip": _PositiveFloat | None,
    "threshold_mode": Literal["quantile", "per_class_quantile", "fixed"],
    "threshold_quantile": Annotated[float, Field(strict=True, gt=0, lt=1)],
    "threshold": _UnitInterval | None,
    "mask_ratio": _UnitInterval,
    "strong_crop_min": Annotated[float, Field(strict=True, ge=0.05, le=1)] | None,
    "rand_augment": Annotated[str, Field(pattern=r"^rand-[a-z0-9.\-]*$", max_length=100)] | None,
    "hflip": Annotated[bool, Field(strict=True)] | None,
    "view_agreement": Annotated[float, Field(strict=True, gt=0, le=1)],
    "mask_cell": _PositiveInt | None,
    "ema_start": _UnitInterval | None,
    "ema_end": _UnitInterval | None,
    "ema_warmup_steps": _NonNegativeInt | None,
    "fairness_weight": _NonNegativeFloat,
    "mim_weight": _NonNegativeFloat,
    "align_weight": _NonNegativeFloat,
    "fairness_samples": Annotated[int, Field(strict=True, ge=1, le=10_000_000)] | None,
    "guard_images": Annotated[int, Field(strict=True, ge=2, le=100_000)],
    "guard_margin": Annotated[float, Field(strict=True, ge=-1, le=1)],
    "seed": _NonNegativeInt,
    "precision": Literal["auto", "fp32", "bf16"],
    "checkpoint_every": _PositiveInt,
    "num_workers": Annotated[int, Field(strict=True, ge=0, le=64)],
}
HPARAM_NAMES: frozenset[str] = frozenset(HPARAM_TYPES)
# Few-label mode's limit: beyond a few images per class a fine-tuning method is the better tool.
MAX_LABELLED_PER_CLASS = 16
# The hyperparameters the instant method uses (the guard's, the seed and the feature pass's);
# the others belong to MUST's training and are refused for an instant job, not ignored.
INSTANT_HPARAM_NAMES: frozenset[str] = frozenset(
    {"guard_images", "guard_margin", "seed", "precision", "num_workers"}
)
_HPARAM_ADAPTERS: dict[str, TypeAdapter[Any]] = {name: TypeAdapter(tp) for name, tp in HPARAM_TYPES.items()}


def _storage_uri(uri: str) -> str:
    """A normalised `s3://` or `file://` URI, or a ValueError naming the accepted schemes."""
    try:
        return str(parse_uri(uri))
    except InvalidRequest as exc:
        raise ValueError(exc.message) from exc


def _location(value: str | None, what: str) -> str | None:
    """An `s3://`/`file://` URI or an absolute local path (relative paths depend on the worker's cwd)."""
    if value is None or "://" in value:
        return None if value is None else _storage_uri(value)
    if not Path(value).is_absolute():
        raise ValueError(f"{what} must be an s3:// URI, a file:// URI or an absolute path, got {value!r}")
    return value


def has_one_slot(template: str) -> bool:
    """Whether `template.format(name)` fills exactly one `{}` and nothing else (`{{`/`}}` are literal)."""
    try:
        fields = [
            (name, spec, conv) for _, name, spec, conv in Formatter().parse(template) if name is not None
        ]
    except ValueError:
        return False
    return fields == [("", "", None)]


def _listed(items: list[str], limit: int = 10) -> str:
    """A short, quoted list of items for an error message."""
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_class_names(names: list[str]) -> list[str]:
    """Stripped class names, or a ValueError that says what to fix."""
    stripped = [name.strip() for name in names]
    if not MIN_CLASSES <= len(stripped) <= MAX_CLASSES:
        raise ValueError(
            f"between {MIN_CLASSES} and {MAX_CLASSES} class names are needed, got {len(stripped)}"
        )
    blank = [str(i) for i, name in enumerate(stripped) if not name]
    if blank:
        positions = ", ".join(blank[:10])
        raise ValueError(f"class names must not be empty or blank; blank at positions {positions}")
    long = [name for name in stripped if len(name) > MAX_CLASS_NAME_CHARS]
    if long:
        raise ValueError(f"class names must be at most {MAX_CLASS_NAME_CHARS} characters: {_listed(long, 3)}")
    repeated = [name for name, count in Counter(stripped).items() if count > 1]
    if repeated:
        raise ValueError(f"class names must be unique; repeated: {_listed(repeated)}")
    return stripped


def check_hparams(values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameter overrides checked by name, type and range, or a ValueError listing the problems."""
    unknown = sorted(set(values) - HPARAM_NAMES)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {_listed(unknown)}; known: {', '.join(sorted(HPARAM_NAMES))}"
        )
    checked, problems = {}, []
    for name, value in values.items():
        try:
            checked[name] = _HPARAM_ADAPTERS[name].validate_python(value)
        except ValidationError as exc:
            problems.append(f"{name}: {exc.errors()[0]['msg']} (got {value!r})")
    if problems:
        raise ValueError("; ".join(problems))
    if checked.get("threshold_mode") == "fixed" and checked.get("threshold") is None:
        raise ValueError("threshold_mode 'fixed' needs a threshold in [0, 1)")
    return checked


class DatasetSpec(BaseModel):
    """Where the unlabeled images are."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(
        description="`s3://bucket/prefix/` (or `file:///abs/path` in embedded mode) holding the images",
        examples=["s3://my-images/unlabeled/"],
    )
    max_images: int | None = Field(default=None, ge=1, le=MAX_INT, description="Use at most this many images")

    _uri = field_validator("uri")(_storage_uri)


class ModelSpec(BaseModel):
    """Which CLIP to start from: an open_clip arch + pretrained tag, or a checkpoint (+ custom config)."""

    model_config = ConfigDict(extra="forbid")

    arch: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=MODEL_NAME_PATTERN,
        description="A built-in open_clip architecture",
        examples=["ViT-B-32"],
    )
    pretrained: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=MODEL_NAME_PATTERN,
        description="An open_clip pretrained tag of the architecture (not a path: use `checkpoint`)",
        examples=["openai"],
    )
    checkpoint: str | None = Field(default=None, description="s3:// or file:// URI, or an absolute path")
    config: str | None = Field(default=None, description="A custom open_clip JSON config (URI or path)")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str | None) -> str | None:
        return _location(value, "model.checkpoint")

    @field_validator("config")
    @classmethod
    def _config(cls, value: str | None) -> str | None:
        return _location(value, "model.config")

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.arch is None and self.config is None:
            raise ValueError("model needs `arch` (an open_clip architecture such as 'ViT-B-32') or `config`")
        if self.config is not None and self.checkpoint is None:
            raise ValueError("model.config needs model.checkpoint (the weights for the custom architecture)")
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("give model.pretrained or model.checkpoint, not both")
        return self


class EvalSpec(BaseModel):
    """An optional labelled set, used only to report accuracy, never to train or to choose what is served."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(
        description="A folder per class (`<uri>/<class name>/<image>`), or a manifest file ending in "
        '`.csv` (rows `key,label`) or `.jsonl` (objects `{"key": ..., "label": ...}`) whose keys are '
        "relative to the manifest's folder; `s3://`, or `file://` in embedded mode. "
        "Labels must be class names",
        examples=["s3://my-images/labelled-eval/"],
    )

    _uri = field_validator("uri")(_storage_uri)


class LabelledSpec(BaseModel):
    """Few-label mode: a few labelled images per class that train beside the unlabeled ones."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(
        description="The eval set's layouts (a folder per class, or a `.csv`/`.jsonl` manifest); "
        f"1..{MAX_LABELLED_PER_CLASS} images for every class, labels must be class names. They train "
        "(MUST: a cross-entropy beside its losses; both methods: class prototypes mixed into the head "
        "and, for the instant method, fixed labels in its fit); the guard that picks what is served "
        "stays label-free",
        examples=["s3://my-images/few-labels/"],
    )

    _uri = field_validator("uri")(_storage_uri)


_CREATE_EXAMPLE: dict[str, Any] = {
    "class_names": ["cat", "dog", "bird"],
    "class_descriptions": {"bird": "a small bird perched on a branch"},
    "dataset": {"uri": "s3://my-images/unlabeled/", "max_images": 50000},
    "model": {"arch": "ViT-B-32", "pretrained": "openai"},
    "templates": ["a photo of a {}.", "a blurry photo of a {}."],
    "hparams": {"total_steps": 2000, "batch_size": 64, "mask_ratio": 0.3},
    "eval": {"uri": "s3://my-images/labelled-eval/"},
}


MAX_NAME_CHARS = 255
MAX_TAGS = 20
# No comma: the database keeps a job's tags as one `,a,b,` string (services/jobs/repository.py).
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/=-]{0,63}$"


# GPUs of one machine a job may ask for: the largest common GPU servers hold 8 or 16.
MAX_GPUS = 16


class Resources(BaseModel):
    """What one job needs of the worker that runs it."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(
        default=1,
        ge=1,
        le=MAX_GPUS,
        description="GPUs of one machine the job trains on, data-parallel (torchrun, one process per GPU; "
        "hparams.batch_size is the global batch, split evenly between them). Only a worker with at "
        "least this many GPUs takes the job (queue `gpu` for 1, `gpu.<N>` for N)",
    )


def requested_gpus(request: Mapping[str, Any] | None) -> int:
    """The GPU count a stored request asks for (1 when it names none), read for routing only."""
    resources = (request or {}).get("resources") or {}
    gpus = resources.get("gpus", 1) if isinstance(resources, Mapping) else 1
    return gpus if isinstance(gpus, int) and 1 <= gpus <= MAX_GPUS else 1


class AdaptationCreate(BaseModel):
    """A request to adapt a CLIP classifier to unlabeled images (DESIGN.md section 3)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_CREATE_EXAMPLE]})

    class_names: list[str] = Field(
        description=f"{MIN_CLASSES}..{MAX_CLASSES} unique, non-empty names",
        # The rules check_class_names enforces, stated in the schema for clients and API fuzzers.
        json_schema_extra={
            "minItems": MIN_CLASSES,
            "maxItems": MAX_CLASSES,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_CLASS_NAME_CHARS, "pattern": r"\S"},
        },
    )
    class_descriptions: dict[str, str] | None = Field(
        default=None,
        description="Extra prompt text per class name: a described class's prompts fill each template's "
        "`{}` with `<name>, <description>` instead of the name alone",
    )
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(arch="ViT-B-32", pretrained="openai"))
    templates: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TEMPLATES,
        description="Prompt templates, each with exactly one `{}`; omitted: a default ensemble",
    )
    hparams: dict[str, Any] | None = Field(
        default=None, description=f"Hyperparameter overrides; known names: {', '.join(sorted(HPARAM_NAMES))}"
    )
    eval: EvalSpec | None = None
    resources: Resources | None = Field(
        default=None, description="What the job needs of its worker; omitted: 1 GPU"
    )
    labelled: LabelledSpec | None = Field(
        default=None, description="Few-label mode: a few labelled images per class (see LabelledSpec)"
    )
    method: Literal["must", "instant"] = Field(
        default="must",
        description='"must": train the image tower and head (hours on large sets); "instant": a '
        "training-free, transductive fit of the head on the images' features (seconds to minutes). "
        "Both are judged by the same label-free guard, which serves zero-shot when they do not beat it",
    )
    warm_start: Literal["instant"] | None = Field(
        default=None,
        description='MUST only: "instant" runs the instant method on the same images first (its '
        "features are cached) and starts MUST's teacher and student from its head when the guard "
        "accepts it; otherwise MUST starts from zero-shot and the job says so",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        pattern=r"^[^\x00-\x1f\x7f]*\S[^\x00-\x1f\x7f]*$",
        description="A name to find the job by (GET /adaptations?name=); need not be unique",
    )
    tags: list[Annotated[str, StringConstraints(pattern=TAG_PATTERN)]] | None = Field(
        default=None,
        max_length=MAX_TAGS,
        description=f"Up to {MAX_TAGS} tags (letters, digits and _.:/=-, at most 64 characters each) "
        "to filter by (GET /adaptations?tag=)",
    )
    min_probability: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Default abstain threshold of /predict for this classifier: below it, the label is "
        "null and `abstained` true (a request's own min_probability overrides it). Choose it from "
        "`outcome.predictions.confidence_quantiles` of the finished job: the q-quantile abstains on "
        "about a fraction q of images like the unlabeled ones",
    )

    _class_names = field_validator("class_names")(check_class_names)

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: list[str] | None) -> list[str] | None:
        return None if tags is None else sorted(set(tags))

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: list[str] | None) -> list[str] | None:
        bad = [t for t in templates or [] if not has_one_slot(t)]
        if bad:
            raise ValueError(
                "every template needs exactly one '{}' for the class name and no other '{...}' field "
                f"(write literal braces as '{{{{' and '}}}}'): {_listed(bad, 3)}"
            )
        return templates

    @field_validator("hparams")
    @classmethod
    def _hparams(cls, values: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if values is None else check_hparams(values)

    @model_validator(mode="after")
    def _batch_splits_over_gpus(self) -> Self:
        gpus = self.resources.gpus if self.resources else 1
        if gpus > 1 and (self.labelled is not None or self.warm_start is not None):
            raise ValueError(
                "few-label mode (labelled) and warm_start run on one GPU for now: omit resources.gpus"
            )
        batch = (self.hparams or {}).get("batch_size")
        if isinstance(batch, int) and batch % gpus:
            raise ValueError(
                f"hparams.batch_size {batch} is the global batch: it must be divisible by "
                f"resources.gpus {gpus}"
            )
        return self

    @model_validator(mode="after")
    def _method_fields(self) -> Self:
        if self.method != "instant":
            return self
        if self.resources is not None and self.resources.gpus > 1:
            raise ValueError("method 'instant' runs on one GPU (it trains nothing): omit resources.gpus")
        if self.warm_start is not None:
            raise ValueError(
                "warm_start applies to method 'must' only (it starts MUST from the instant head)"
            )
        unused = sorted(set(self.hparams or {}) - INSTANT_HPARAM_NAMES)
        if unused:
            raise ValueError(
                f"hyperparameter(s) {_listed(unused)} train MUST and do not apply to method 'instant'; "
                f"it accepts: {', '.join(sorted(INSTANT_HPARAM_NAMES))}"
            )
        return self

    @model_validator(mode="after")
    def _descriptions_name_classes(self) -> Self:
        if self.class_descriptions is None:
            return self
        self.class_descriptions = {key.strip(): text for key, text in self.class_descriptions.items()}
        unknown = sorted(set(self.class_descriptions) - set(self.class_names))
        if unknown:
            raise ValueError(f"class_descriptions has keys that are not class names: {_listed(unknown)}")
        return self


class Progress(BaseModel):
    """How far a job's training has come."""

    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    images_per_sec: float | None = None
    eta_seconds: float | None = None
    fraction: float | None = Field(default=None, ge=0, le=1, description="step / total_steps")


class ArtifactRef(BaseModel):
    """The published adapted classifier."""

    uri: str
    sha256: str | None = None


class ArtifactFile(BaseModel):
    """One file of an adapted classifier and where to download it."""

    name: str = Field(description='"model.safetensors" or "manifest.json"')
    size: int
    sha256: str
    url: str = Field(
        description="A presigned S3 URL (send no API key with it), or, in embedded mode, a path of this "
        "API that streams the file (send the API key)"
    )


class ArtifactDownload(BaseModel):
    """Everything needed to download a succeeded job's classifier and check it."""

    adaptation_id: str
    sha256: str = Field(description="sha256 of model.safetensors, as in the manifest and the job")
    served: str | None = None
    expires_in_seconds: int | None = Field(default=None, description="How long presigned URLs stay valid")
    files: list[ArtifactFile]


class JobErrorInfo(BaseModel):
    """Why a job failed."""

    type: str
    message: str


_PUBLIC_EXAMPLE: dict[str, Any] = {
    "id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10",
    "tenant": "acme",
    "status": "running",
    "phase": "training",
    "created_at": "2026-11-25T10:00:00Z",
    "started_at": "2026-11-25T10:00:05Z",
    "finished_at": None,
    "heartbeat_at": "2026-11-25T10:12:00Z",
    "cancel_requested": False,
    "progress": {
        "step": 500,
        "total_steps": 2000,
        "epoch": 3,
        "images_per_sec": 210.5,
        "eta_seconds": 1425.0,
        "fraction": 0.25,
    },
    "latest_metrics": {"loss": 1.92, "confident_fraction": 0.61},
    "images_used": 48210,
    "images_skipped": 12,
    "skipped_reasons": {"not_an_image": 9, "unreadable": 3},
    "artifact": None,
    "checkpoint_uri": "s3://must-artifacts/adaptations/0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10/checkpoints/latest.json",
    "error": None,
    "phases": [
        {"phase": "queued", "started_at": "2026-11-25T10:00:00Z", "ended_at": "2026-11-25T10:00:05Z"},
        {"phase": "listing", "started_at": "2026-11-25T10:00:05Z", "ended_at": "2026-11-25T10:00:06Z"},
        {"phase": "staging", "started_at": "2026-11-25T10:00:06Z", "ended_at": "2026-11-25T10:03:40Z"},
        {
            "phase": "scoring_zero_shot",
            "started_at": "2026-11-25T10:03:40Z",
            "ended_at": "2026-11-25T10:04:30Z",
        },
        {"phase": "training", "started_at": "2026-11-25T10:04:30Z", "ended_at": None},
    ],
    "evaluation": None,
    "request": _CREATE_EXAMPLE,
}


class GuardCandidate(BaseModel):
    """One classifier the label-free guard considered, with its scores (see services/must/guard.py)."""

    name: str = Field(description='"zero_shot", "teacher", "student", "teacher@<step>" or "instant"')
    step: int
    margin: float = Field(description="The criterion: neighbourhood gain over zero-shot, in both spaces")
    gain_zs_space: float
    gain_own_space: float
    zero_shot_in_own_space: float
    balance: float = Field(description="Entropy of the predicted-class shares / log K")
    agreement_with_zero_shot: float | None = None
    mean_confidence: float | None = None


class Outcome(BaseModel):
    """What a succeeded job serves and the label-free evidence it chose on."""

    served: str
    reason: str
    candidates: list[GuardCandidate]
    method: Literal["must", "instant"] = "must"
    warm_start: dict[str, Any] | None = Field(
        default=None,
        description='With `warm_start: "instant"`: whether MUST started from the instant head '
        "(`used`), and the instant run's guard decision",
    )
    views: dict[str, Any] | None = Field(
        default=None, description="The student's view strength fitted without labels, and its agreement"
    )
    threshold: list[float] = Field(default_factory=list)
    predictions: dict[str, Any] | None = Field(
        default=None,
        description="On the guard's sample of the unlabeled images: images per class from zero-shot and "
        "from the served classifier (class_counts), and quantiles of the served confidence",
    )


class PhaseSpan(BaseModel):
    """One phase of a job, from its start to the start of the next (None: the job is in it now)."""

    phase: JobPhase
    started_at: datetime
    ended_at: datetime | None = None

    @classmethod
    def from_span(cls, span: JobPhaseSpan) -> PhaseSpan:
        """The public view of a phase history row."""
        return cls(phase=span.phase, started_at=span.started_at, ended_at=span.ended_at)


class EvalScore(BaseModel):
    """One classifier's scores on the labelled eval set."""

    top1: float = Field(description="Top-1 accuracy in percent")
    per_class_recall: dict[str, float] = Field(
        description="Per class name: the share (0..1) of its images predicted as it; NaN-free, a class "
        "without images is left out"
    )
    confusion: list[list[int]] = Field(
        description="Rows are the true classes, columns the predicted ones, both in `class_names` order"
    )


class EvaluationReport(BaseModel):
    """Scores on the labelled eval set: reported only, it never trains or chooses what is served."""

    images: int
    class_names: list[str]
    served: str = Field(description="The classifier the job serves (the `served` candidate is that one)")
    candidates: dict[str, EvalScore] = Field(
        description='Keys "zero_shot", "teacher", "student" and "served" (MUST), or "zero_shot", '
        '"instant" and "served" (instant)'
    )


_EVALUATION_EXAMPLE: dict[str, Any] = {
    "images": 4,
    "class_names": ["cat", "dog"],
    "served": "teacher",
    "candidates": {
        name: {"top1": top1, "per_class_recall": recall, "confusion": confusion}
        for name, top1, recall, confusion in [
            ("zero_shot", 50.0, {"cat": 1.0, "dog": 0.0}, [[2, 0], [2, 0]]),
            ("teacher", 75.0, {"cat": 1.0, "dog": 0.5}, [[2, 0], [1, 1]]),
            ("student", 75.0, {"cat": 0.5, "dog": 1.0}, [[1, 1], [0, 2]]),
            ("served", 75.0, {"cat": 1.0, "dog": 0.5}, [[2, 0], [1, 1]]),
        ]
    },
}


class AdaptationPublic(BaseModel):
    """An adaptation job as clients see it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_PUBLIC_EXAMPLE]})

    id: str
    tenant: str = Field(default="default", description="The project (API key owner) the job belongs to")
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    status: JobStatus
    phase: JobPhase | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    cancel_requested: bool = False
    progress: Progress
    latest_metrics: dict[str, Any] | None = None
    images_used: int = 0
    images_skipped: int = 0
    skipped_reasons: dict[str, int] = Field(default_factory=dict)
    artifact: ArtifactRef | None = None
    served: str | None = Field(
        default=None,
        description='The classifier the job serves: "teacher", "student", "teacher@<step>", or "zero_shot" '
        "when no adapted classifier beat zero-shot by the label-free guard",
    )
    outcome: Outcome | None = None
    checkpoint_uri: str | None = None
    error: JobErrorInfo | None = None
    phases: list[PhaseSpan] = Field(
        default_factory=list, description="Every phase the job went through, oldest first"
    )
    evaluation: EvaluationReport | None = Field(
        default=None,
        description="Scores of zero-shot, teacher, student and the served classifier on the request's "
        "labelled eval set (only when it named one and the job succeeded)",
        examples=[_EVALUATION_EXAMPLE],
    )
    request: dict[str, Any] = Field(description="The request as accepted (normalised AdaptationCreate)")

    @classmethod
    def from_job(cls, job: Job) -> AdaptationPublic:
        """The public view of a job row (no lease, traceback or idempotency key)."""
        return cls(
            id=job.id,
            tenant=job.tenant,
            name=job.name,
            tags=[tag for tag in (job.tags or "").split(",") if tag],
            status=job.status,
            phase=job.phase,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
            cancel_requested=job.cancel_requested,
            progress=_progress(job),
            latest_metrics=job.latest_metrics,
            images_used=job.images_used,
            images_skipped=job.images_skipped,
            skipped_reasons=job.skipped_reasons or {},
            artifact=_artifact(job),
            served=job.served,
            outcome=Outcome.model_validate(job.outcome) if job.outcome else None,
            checkpoint_uri=job.checkpoint_uri,
            error=_error(job),
            phases=[PhaseSpan.from_span(span) for span in job.phases],
            evaluation=EvaluationReport.model_validate(job.evaluation) if job.evaluation else None,
            request=job.request,
        )


def _artifact(job: Job) -> ArtifactRef | None:
    return ArtifactRef(uri=job.artifact_uri, sha256=job.artifact_sha256) if job.artifact_uri else None


def _error(job: Job) -> JobErrorInfo | None:
    if job.status != JobStatus.FAILED:
        return None
    return JobErrorInfo(type=job.error_type or "Error", message=job.error_message or "")


def _progress(job: Job) -> Progress:
    if job.status == JobStatus.SUCCEEDED:
        fraction: float | None = 1.0
    else:
        fraction = min(1.0, job.step / job.total_steps) if job.total_steps else None
    return Progress(
        step=job.step,
        total_steps=job.total_steps,
        epoch=job.epoch,
        images_per_sec=job.images_per_sec,
        eta_seconds=job.eta_seconds,
        fraction=fraction,
    )


class AdaptationsPage(BaseModel):
    """One page of jobs, newest first."""

    items: list[AdaptationPublic]
    total: int = Field(description="How many jobs match the filter")
    limit: int
    offset: int


class MetricPoint(BaseModel):
    """One row of a job's metric history."""

    step: int
    created_at: datetime
    values: dict[str, Any]

    @classmethod
    def from_metric(cls, metric: JobMetric) -> MetricPoint:
        """The public view of a metrics row."""
        return cls(step=metric.step, created_at=metric.created_at, values=metric.values)


class MetricsPage(BaseModel):
    """A job's metric history, in step order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "adaptation_id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10",
                    "items": [
                        {"step": 50, "created_at": "2026-11-25T10:01:00Z", "values": {"loss": 2.41}},
                        {"step": 100, "created_at": "2026-11-25T10:02:00Z", "values": {"loss": 2.17}},
                    ],
                }
            ]
        }
    )

    adaptation_id: str
    items: list[MetricPoint]


class SeriesPoints(BaseModel):
    """One metric's (downsampled) points: `values[i]` was measured at `steps[i]`."""

    steps: list[int]
    values: list[float]


class MetricSeries(BaseModel):
    """A job's metric history as one series per metric, each at most `max_points` long."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "adaptation_id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10",
                    "rows": 3,
                    "max_points": 1000,
                    "last_step": 150,
                    "series": {"loss": {"steps": [50, 100, 150], "values": [2.41, 2.17, 1.98]}},
                }
            ]
        }
    )

    adaptation_id: str
    rows: int = Field(description="How many metric rows the series were made from")
    max_points: int
    last_step: int | None = Field(description="The step of the newest row, None before the first")
    series: dict[str, SeriesPoints]


class SampleClass(BaseModel):
    """The sample images the served classifier put in one class (thumbnails: GET .../samples/{class}/{i})."""

    index: int
    name: str
    images: int = Field(description="How many sample images this class has (thumbnail positions 0..images-1)")
    zero_shot: list[int] = Field(description="The class zero-shot gave each of these images")
    confidence: list[float] = Field(description="The served classifier's probability for its class")


class SamplesPublic(BaseModel):
    """A few of the job's unlabeled images per class the served classifier predicted."""

    adaptation_id: str
    classifier: str = Field(description="The classifier whose predictions these are (the served one)")
    per_class: int
    images: int = Field(description="How many images (the guard's sample) the examples were drawn from")
    classes: list[SampleClass]


class LogLine(BaseModel):
    """One line the worker logged while running the job."""

    id: int = Field(description="Increasing; pass the last one seen as `after` to page on")
    time: datetime
    level: str
    logger: str
    message: str

    @classmethod
    def from_row(cls, row: JobLogLine) -> LogLine:
        """The public view of a log row."""
        return cls(id=row.id, time=row.created_at, level=row.level, logger=row.logger, message=row.message)


class LogsPage(BaseModel):
    """A job's worker log lines, oldest first."""

    adaptation_id: str
    items: list[LogLine]


class TrainJobMessage(BaseModel):
    """The queue payload: only the job id; the worker reads everything else from the database."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"job_id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10"}]}
    )

    job_id: str = Field(min_length=1, max_length=36)
    # Routing only (the queue is chosen by it); the worker reads the job's needs from its request.
    gpus: int = Field(default=1, ge=1, le=MAX_GPUS)
