"""Export an ImageClassifier as `model.safetensors` + `manifest.json`, and load it back without pickle.

The manifest carries everything needed to rebuild the classifier offline: the full open_clip
model config (only its vision part is instantiated), class names, templates, preprocessing,
the logit scale, metrics, the source model and the sha256 of the weights file. Loading one needs
no open_clip: the image tower is `vision.VisionTower`, which takes open_clip's state dict as it
is, and only a tower it does not cover is built by open_clip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from services.must import vision
from services.must.checkpoint import sha256_file, write_json_atomic
from services.must.errors import CheckpointError
from services.must.inference import ImageClassifier
from services.must.preprocess import preprocess_to_dict
from services.must.state_io import save_tensors

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = "must-classifier/1"
CODE_VERSION = "0.1.0"


@dataclass
class Manifest:
    """The JSON document that describes an exported classifier."""

    model_cfg: dict[str, Any]
    class_names: list[str]
    templates: list[str]
    preprocess: dict[str, Any]
    logit_scale: float
    weights_sha256: str
    source_model: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    network: str = "teacher"
    format: str = FORMAT
    code_version: str = CODE_VERSION
    created_at: str = field(default_factory=lambda: iso_utc(datetime.now(UTC)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise CheckpointError(
                f"unsupported classifier format {data.get('format')!r}; expected {FORMAT!r}"
            )
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("created_at"), int | float):  # exports before ISO 8601: Unix seconds
            values["created_at"] = iso_utc(datetime.fromtimestamp(values["created_at"], UTC))
        return cls(**values)


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, as the HTTP API writes its timestamps (`2026-11-25T10:00:00.5Z`)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def export_classifier(
    classifier: ImageClassifier,
    out_dir: Path,
    *,
    model_cfg: dict[str, Any],
    templates: list[str],
    source_model: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    network: str = "teacher",
) -> Manifest:
    """Write weights first, then the manifest (the manifest's presence marks a complete export)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"visual.{k}": v for k, v in classifier.visual.state_dict().items()}
    tensors["head"] = classifier.head
    weights = out_dir / WEIGHTS
    save_tensors(weights, tensors, metadata={"format": FORMAT})
    manifest = Manifest(
        model_cfg=model_cfg,
        class_names=classifier.class_names,
        templates=list(templates),
        preprocess=preprocess_to_dict(classifier.preprocess_cfg),
        logit_scale=classifier.logit_scale,
        weights_sha256=sha256_file(weights),
        source_model=source_model,
        metrics=metrics or {},
        network=network,
    )
    write_json_atomic(out_dir / MANIFEST, manifest.__dict__)
    return manifest


def read_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no {MANIFEST}; is it an exported classifier?")
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid manifest: {exc}") from exc


def load_classifier(
    model_dir: Path, device: str | torch.device = "cpu", verify: bool = True
) -> ImageClassifier:
    """Rebuild an exported classifier; the weights must match the manifest's sha256 when `verify`."""
    manifest = read_manifest(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{model_dir} has a manifest but no {WEIGHTS}")
    if verify and sha256_file(weights) != manifest.weights_sha256:
        raise CheckpointError(f"{weights} does not match the sha256 recorded in its manifest")
    tensors = load_file(str(weights))
    visual_state = {k[len("visual.") :]: v for k, v in tensors.items() if k.startswith("visual.")}
    try:
        visual = _load_visual(manifest.model_cfg, visual_state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match the manifest's model config: {exc}") from exc
    classifier = ImageClassifier(
        visual, tensors["head"], manifest.logit_scale, manifest.class_names, manifest.preprocess
    )
    return classifier.to(device).eval()


def _load_visual(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The image tower of `cfg` holding `state`, built on the meta device and handed the tensors
    (a randomly initialised copy would double the peak memory of a load: 350 MB for ViT-B-32)."""
    if vision.supports(cfg):
        return vision.load_vision_tower(cfg, state)
    from open_clip.model import _build_vision_tower

    with torch.device("meta"):
        visual = _build_vision_tower(
            cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False)
        )
    visual.load_state_dict(state, assign=True)
    return visual
