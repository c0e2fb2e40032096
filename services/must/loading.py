"""Build an open_clip CLIP ViT from an architecture name, a local checkpoint or a custom config.

open_clip is imported by the functions that need it, not with this module: importing it brings
timm, torchvision and huggingface_hub (hundreds of MB), which a process that only serves exported
classifiers never needs, although it names models with `ModelSpec` and may build a zero-shot
baseline later.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.must.errors import ModelLoadError, WeightsUnavailable
from services.must.preprocess import preprocess_to_dict
from services.must.spec import ModelSpec

if TYPE_CHECKING:
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transform import PreprocessCfg
    from open_clip.transformer import VisionTransformer

__all__ = [
    "LoadedClip",
    "ModelSpec",
    "load_clip",
    "make_tokenizer",
    "preprocess_to_dict",
    "pretrained_file",
    "resolve_model_config",
    "upload_hint",
]

log = logging.getLogger(__name__)
# open_clip's names for a hub repository's weights (open_clip.constants).
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"


@dataclass
class LoadedClip:
    """A CLIP ViT plus what is needed to use it: tokenizer, preprocessing and its model config."""

    model: CLIP | CustomTextCLIP
    tokenizer: Any
    preprocess: PreprocessCfg
    model_cfg: dict[str, Any]

    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual  # type: ignore[return-value]

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature (100 for the public CLIPs), capped at 100 as in CLIP."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))


def _read_config(config: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise ModelLoadError(f"model config file {config!r} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"model config {config!r} is not valid JSON: {exc}") from exc
    if isinstance(cfg, dict) and "model_cfg" in cfg:  # open_clip's open_clip_config.json layout
        wrapper, cfg = cfg, cfg["model_cfg"]
        if isinstance(cfg, dict) and isinstance(wrapper.get("preprocess_cfg"), dict):
            cfg = {"preprocess_cfg": wrapper["preprocess_cfg"], **cfg}
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"a model config must be a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise ModelLoadError("a custom model config needs 'embed_dim', 'vision_cfg' and 'text_cfg' keys")
    return cfg


def resolve_model_config(spec: ModelSpec) -> dict[str, Any]:
    """The full open_clip model config for a spec, without building the model."""
    import open_clip

    if spec.config is not None:
        return _read_config(spec.config)
    if not spec.arch:
        raise ModelLoadError("a model needs an architecture name or a custom config")
    # Only built-in names: open_clip reads `hf-hub:org/repo` configs from the internet and
    # `local-dir:/path` ones from the disk.
    cfg = open_clip.get_model_config(spec.arch) if spec.arch in open_clip.list_models() else None
    if cfg is None:
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-") and _is_usable_vit(m)]
        raise ModelLoadError(
            f"unknown architecture {spec.arch!r}; open_clip ViTs include: {', '.join(vits[:12])}"
        )
    if spec.pretrained and open_clip.get_pretrained_cfg(spec.arch, spec.pretrained).get("quick_gelu"):
        # OpenAI's weights (and some others) were trained with QuickGELU, which the plain
        # architecture configs (e.g. "ViT-B-32") leave out; open_clip only warns about it.
        cfg["quick_gelu"] = True
    return cfg


def _is_usable_vit(arch: str) -> bool:
    import open_clip

    try:
        _check_vit(open_clip.get_model_config(arch) or {}, arch)
    except ModelLoadError:
        return False
    return True


def _check_vit(cfg: dict[str, Any], name: str) -> None:
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), list | tuple):
        raise ModelLoadError(f"{name} does not have an open_clip ViT image tower; MUST needs one")
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok":
        raise ModelLoadError(f"{name} pools its image tokens without a class token; MUST needs one")
    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise ModelLoadError(f"{name} uses a Hugging Face text tower, which cannot be loaded offline")


def _instantiate(cfg: dict[str, Any]) -> CLIP | CustomTextCLIP:
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = {k: v for k, v in cfg.items() if k not in ("custom_text", "preprocess_cfg")}
    cls = CustomTextCLIP if cfg.get("custom_text") else CLIP
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"invalid model config: {exc}") from exc


def _load_weights(model: torch.nn.Module, checkpoint: str, name: str) -> None:
    if not Path(checkpoint).is_file():
        raise ModelLoadError(f"checkpoint file {checkpoint!r} does not exist")
    import open_clip

    try:
        open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = " ".join(str(exc).split())[:400]  # torch puts the useful part after the first line
        raise ModelLoadError(f"checkpoint {checkpoint!r} does not match {name}: {first}") from exc
    except Exception as exc:  # an unreadable file surfaces as many different error types
        raise ModelLoadError(f"checkpoint {checkpoint!r} cannot be read: {exc}") from exc


def _build_from_arch(spec: ModelSpec, cfg: dict[str, Any]) -> CLIP | CustomTextCLIP:
    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import merge_preprocess_dict

    assert spec.arch is not None
    quick_gelu = bool(cfg.get("quick_gelu"))
    checkpoint = spec.checkpoint
    if checkpoint and not Path(checkpoint).is_file():
        raise ModelLoadError(f"checkpoint file {checkpoint!r} does not exist")
    if spec.pretrained:
        checkpoint = pretrained_file(spec)
    model = open_clip.create_model(spec.arch, pretrained=None, force_quick_gelu=quick_gelu)
    if checkpoint:
        _load_weights(model, checkpoint, spec.describe())
    if spec.pretrained:
        # The tag's own preprocessing (mean, std, resize mode), as open_clip applies it for a tag.
        tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
        set_model_preprocess_cfg(model, merge_preprocess_dict(model.visual.preprocess_cfg, tag_cfg))
    return model


def _hub_files(hf_hub: str) -> tuple[str, list[str]]:
    """The repository of an open_clip `hf_hub` entry and its weight file names, safetensors first."""
    # `org/repo/file.bin`, or `org/repo/` for the repository's default weights file.
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo_id, names


def _hub_download(repo_id: str, names: list[str], *, local_only: bool, timeout: float) -> str | None:
    """The first of `names` found in the repository (cache only, or from the hub), or None."""
    from huggingface_hub import hf_hub_download

    for name in names:
        try:
            path: str = hf_hub_download(
                repo_id, name, local_files_only=local_only, etag_timeout=timeout, library_name="open_clip"
            )
        except Exception as exc:  # the hub client raises many types: missing file, offline, HTTP errors
            log.debug("no %s in %s (%s)", name, repo_id, exc)
            continue
        return path
    return None


def pretrained_file(spec: ModelSpec) -> str:
    """The local weights file of an open_clip pretrained tag: cached, or downloaded when allowed."""
    import open_clip

    assert spec.arch is not None
    assert spec.pretrained is not None
    tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not tag_cfg.get("hf_hub"):
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise ModelLoadError(
            f"unknown pretrained tag {spec.pretrained!r} for {spec.arch}; known tags: {tags}"
        )
    repo_id, names = _hub_files(tag_cfg["hf_hub"])
    cached = _hub_download(repo_id, names, local_only=True, timeout=spec.download_timeout)
    if cached is not None:
        return cached
    what = f"the weights of {spec.arch} ({spec.pretrained})"
    if not spec.allow_download:
        raise WeightsUnavailable(
            f"{what} are not in this machine's model cache and downloads are turned off "
            f"(MUST_MODELS__ALLOW_DOWNLOADS); {upload_hint(spec)}, or allow downloads on machines "
            "that reach huggingface.co",
            transient=False,
        )
    # The hub client bounds each request by the timeout; this bounds the whole fetch, retries included.
    done: Future[str | None] = Future()

    def fetch() -> None:
        try:
            done.set_result(_hub_download(repo_id, names, local_only=False, timeout=spec.download_timeout))
        except BaseException as exc:  # handed to the waiting thread
            done.set_exception(exc)

    threading.Thread(target=fetch, name=f"download-{spec.arch}", daemon=True).start()
    try:
        path = done.result(timeout=spec.download_timeout)
    except TimeoutError:
        raise WeightsUnavailable(
            f"{what} could not be downloaded within {spec.download_timeout:g} s; {upload_hint(spec)}"
        ) from None
    if path is None:
        raise WeightsUnavailable(
            f"{what} could not be downloaded from the model hub (unreachable or missing); {upload_hint(spec)}"
        )
    return path


def upload_hint(spec: ModelSpec) -> str:
    """What to do without the hub: the weights as a file, named as the checkpoint."""
    arch = spec.arch or "the architecture"
    # OpenAI's weights were trained with QuickGELU; a bare file does not say so (see README).
    if spec.pretrained == "openai" and spec.arch and not spec.arch.endswith("-quickgelu"):
        arch = f"{spec.arch}-quickgelu"
    return (
        "upload a weights file (an open_clip state dict or .safetensors) and pass it as "
        f'model.checkpoint with model.arch "{arch}" and no model.pretrained'
    )


def make_tokenizer(cfg: dict[str, Any], arch: str | None) -> Any:
    """open_clip's tokenizer for a built-in architecture, else CLIP's BPE at the config's context length."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    if arch and open_clip.get_model_config(arch) is not None:
        return open_clip.get_tokenizer(arch)
    return SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))


def load_clip(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedClip:
    """Build the CLIP a spec names, in fp32 and eval mode, on `device`."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    from open_clip.transformer import VisionTransformer

    cfg = resolve_model_config(spec)
    name = spec.describe()
    _check_vit(cfg, name)
    if spec.config is not None:
        if spec.pretrained:
            raise ModelLoadError("a custom config takes a checkpoint file, not a pretrained tag")
        model = _instantiate(cfg)
        if spec.checkpoint:
            _load_weights(model, spec.checkpoint, name)
    else:
        model = _build_from_arch(spec, cfg)
    if not isinstance(model.visual, VisionTransformer):
        raise ModelLoadError(f"{name} does not have an open_clip ViT image tower; MUST needs one")
    preprocess = merge_preprocess_dict(
        PreprocessCfg(), {**getattr(model.visual, "preprocess_cfg", {}), **cfg.get("preprocess_cfg", {})}
    )
    preprocess["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess)
    model = model.to(device=device, dtype=torch.float32).eval()
    return LoadedClip(model, make_tokenizer(cfg, spec.arch), PreprocessCfg(**preprocess), cfg)
