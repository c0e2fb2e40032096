"""Export an adapted classifier to ONNX, to serve it without this platform (onnxruntime, Triton, ...).

The graph takes `pixels`, a float32 batch [N, 3, H, W] already preprocessed the way the manifest
says (resize, centre crop, normalise with its mean and std: `metadata["preprocess"]`), and gives
`probabilities` [N, K] (softmax) and `logits` [N, K]. The model's metadata_props carry the class
names (a JSON list, in the output's column order), the preprocessing, the logit scale and the
sha256 of the weights it came from. Needs the `onnx` extra.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.must.errors import MustError
from services.must.export import Manifest, load_classifier, read_manifest
from services.must.inference import ImageClassifier
from services.must.loading import preprocess_to_dict

# Opset 18 is what torch's exporter targets by default and every current onnxruntime runs.
OPSET = 18
INPUT, PROBABILITIES, LOGITS = "pixels", "probabilities", "logits"


class _Probabilities(nn.Module):
    """The classifier with softmax on top, in fp32, as one graph with two outputs."""

    def __init__(self, classifier: ImageClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(pixels).float()
        return logits.softmax(-1), logits


def onnx_metadata(classifier: ImageClassifier, manifest: Manifest | None = None) -> dict[str, str]:
    """The key/value strings written into the ONNX model's metadata_props."""
    meta: dict[str, Any] = {
        "class_names": classifier.class_names,
        "preprocess": preprocess_to_dict(classifier.preprocess_cfg),
        "logit_scale": classifier.logit_scale,
        "input": f"{INPUT}: float32 [N, 3, H, W], resized, centre-cropped and normalised per preprocess",
        "outputs": f"{PROBABILITIES}, {LOGITS}: float32 [N, K], columns in class_names order",
    }
    if manifest is not None:
        meta |= {
            "weights_sha256": manifest.weights_sha256,
            "source_model": manifest.source_model,
            "network": manifest.network,
            "created_at": manifest.created_at,
        }
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}


def export_onnx(
    classifier: ImageClassifier, path: Path, *, manifest: Manifest | None = None, opset: int = OPSET
) -> Path:
    """Write `classifier` as an ONNX model at `path` (batch size free, input side fixed)."""
    try:
        import onnx
    except ImportError as exc:
        raise MustError("ONNX export needs the onnx package: pip install -e '.[onnx]'") from exc
    side = _input_side(classifier)
    model = _Probabilities(classifier.float().cpu().eval())
    example = torch.zeros(1, 3, side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # The TorchScript exporter (deprecated since torch 2.9, still shipped): a ViT traces into one
        # self-contained file without onnxscript, and `dynamic_axes` frees the batch size.
        # https://docs.pytorch.org/docs/stable/onnx_torchscript.html
        # nn.MultiheadAttention's fused inference kernel has no ONNX export; the plain path does.
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=[INPUT],
                output_names=[PROBABILITIES, LOGITS],
                dynamic_axes={INPUT: {0: "batch"}, PROBABILITIES: {0: "batch"}, LOGITS: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        graph = onnx.load(str(tmp))
        onnx.helper.set_model_props(graph, onnx_metadata(classifier, manifest))
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        tmp.replace(path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    return path


def export_onnx_from_dir(model_dir: Path, path: Path, *, opset: int = OPSET) -> Path:
    """Convert an exported classifier folder (model.safetensors + manifest.json) to ONNX."""
    return export_onnx(load_classifier(model_dir), path, manifest=read_manifest(model_dir), opset=opset)


def _input_side(classifier: ImageClassifier) -> int:
    size = classifier.preprocess_cfg.size
    return int(size if isinstance(size, int) else size[0])
