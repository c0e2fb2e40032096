"""Every object key the platform writes, in one place (DESIGN.md section 6).

Keys are relative to the artifacts store's root, e.g. `adaptations/<job-id>/classifier/model.safetensors`.
"""

from __future__ import annotations

from services.errors import InvalidRequest


def _segment(value: str, what: str) -> str:
    """Refuse values that would escape their folder or add one (`/`, `..`, empty)."""
    if not value or "/" in value or "\\" in value or value in {".", ".."}:
        raise InvalidRequest(f"invalid {what} {value!r} for a storage key")
    return value


def join_key(prefix: str, key: str) -> str:
    """Join a key prefix and a key with exactly one `/` between them (an empty prefix adds none)."""
    if not prefix:
        return key
    return f"{prefix.rstrip('/')}/{key.lstrip('/')}"


# The folder of the artifacts store under which every job's files are.
ADAPTATIONS_FOLDER = "adaptations"


def adaptation_prefix(job_id: str) -> str:
    """The folder holding everything one adaptation job writes."""
    return f"{ADAPTATIONS_FOLDER}/{_segment(job_id, 'job id')}/"


def checkpoint_name(step: int, suffix: str) -> str:
    """The file name of a periodic checkpoint, e.g. `step-000500.safetensors` (sorts by step)."""
    if step < 0:
        raise InvalidRequest(f"checkpoint step must be >= 0, got {step}")
    return _segment(f"step-{step:06d}{suffix}", "checkpoint name")


def checkpoint_key(job_id: str, name: str) -> str:
    """A file inside the job's checkpoint folder."""
    return f"{adaptation_prefix(job_id)}checkpoints/{_segment(name, 'checkpoint name')}"


def latest_checkpoint_key(job_id: str) -> str:
    """The pointer to the newest complete checkpoint, written after the checkpoint's files."""
    return checkpoint_key(job_id, "latest.json")


# The files of an exported classifier, weights first (the order they are published in).
CLASSIFIER_FILES = ("model.safetensors", "manifest.json")


def classifier_key(job_id: str, name: str) -> str:
    """One file of the job's exported classifier (a name of CLASSIFIER_FILES)."""
    if name not in CLASSIFIER_FILES:
        raise InvalidRequest(
            f"a classifier has no file {name!r}; its files are {', '.join(CLASSIFIER_FILES)}"
        )
    return f"{adaptation_prefix(job_id)}classifier/{name}"


def classifier_weights_key(job_id: str) -> str:
    """The final adapted classifier's weights (image tower + head)."""
    return f"{adaptation_prefix(job_id)}classifier/model.safetensors"


def classifier_manifest_key(job_id: str) -> str:
    """The classifier's manifest, written after its weights."""
    return f"{adaptation_prefix(job_id)}classifier/manifest.json"


def metrics_key(job_id: str) -> str:
    """The job's metric history as JSON lines."""
    return f"{adaptation_prefix(job_id)}metrics.jsonl"


def prediction_results_key(job_id: str, run_id: str) -> str:
    """The JSONL of a batch prediction run, kept with its adaptation (deleted with it)."""
    return f"{adaptation_prefix(job_id)}predictions/{_segment(run_id, 'prediction run id')}.jsonl"


# Image features of the instant method, shared by every job of the same image tower and images.
FEATURES_FOLDER = "features"


def features_key(cache_key: str) -> str:
    """The cached features the engine names `<tower sha256>/<images sha256>.safetensors`."""
    parts = cache_key.split("/")
    if len(parts) != 2:
        raise InvalidRequest(f"invalid features cache key {cache_key!r}")
    return f"{FEATURES_FOLDER}/{_segment(parts[0], 'tower digest')}/{_segment(parts[1], 'features name')}"
