"""The zero-shot classifier head built once from class names and prompt templates.

open_clip is imported on first use (the default templates, a head), not with this module: the
inference service validates class names with it and should not pay for open_clip until a
zero-shot request arrives.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import torch

from services.must.errors import ConfigError

MAX_CLASSES = 10_000


@cache
def default_templates() -> tuple[str, ...]:
    """The seven-prompt subset CLIP's authors selected from their 80 ImageNet prompts.

    It beats the single "a photo of a {}." prompt on most data sets and costs a tenth of the
    full ensemble.
    """
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)


def __getattr__(name: str) -> Any:
    """`DEFAULT_TEMPLATES`, read from open_clip when first asked for (PEP 562)."""
    if name == "DEFAULT_TEMPLATES":
        return default_templates()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate_class_names(class_names: Sequence[str]) -> list[str]:
    """Stripped class names, or a ConfigError that says what is wrong with them."""
    names = [str(n).strip() for n in class_names]
    if len(names) < 2:
        raise ConfigError(f"at least two class names are needed, got {len(names)}")
    if len(names) > MAX_CLASSES:
        raise ConfigError(f"at most {MAX_CLASSES} class names are supported, got {len(names)}")
    if any(not n for n in names):
        raise ConfigError("class names must not be empty")
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dupes:
        raise ConfigError(f"class names must be unique; repeated: {', '.join(dupes[:10])}")
    return names


def validate_templates(templates: Sequence[str] | None) -> list[str]:
    """User templates (each with exactly one `{}`), or the default ensemble."""
    if templates is None:
        return list(default_templates())
    out = [str(t) for t in templates]
    if not out:
        raise ConfigError("templates must not be empty; omit them to use the default ensemble")
    bad = [t for t in out if not _fills_one_slot(t)]
    if bad:
        raise ConfigError(
            "every template needs exactly one '{}' for the class name and no other '{...}' field "
            f"(literal braces are written '{{{{' and '}}}}'); bad: {bad[:3]}"
        )
    return out


def described_names(class_names: Sequence[str], descriptions: Mapping[str, str] | None = None) -> list[str]:
    """What fills each template's `{}`: `<name>, <description>` for a described class, else the name.

    So "a photo of a {}." becomes "a photo of a bird, a small bird perched on a branch." and every
    class keeps one prompt per template (the ensemble stays balanced across classes).
    """
    descriptions = descriptions or {}
    unknown = sorted(set(descriptions) - set(class_names))
    if unknown:
        raise ConfigError(f"class descriptions name classes that are not in the class list: {unknown[:10]}")
    out = []
    for name in class_names:
        text = (descriptions.get(name) or "").strip()
        out.append(f"{name}, {text}" if text else name)
    return out


def _fills_one_slot(template: str) -> bool:
    """Whether `template.format(name)`, as open_clip fills templates, has one `{}` and no other field."""
    try:
        fields = [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError:
        return False
    return fields == [("", "", None)]


@torch.no_grad()
def build_text_head(
    model: torch.nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
    classes_per_batch: int = 64,
) -> torch.Tensor:
    """[embed_dim, num_classes] head: per class, the renormalised mean of its normalised prompt embeddings."""
    import open_clip

    head = open_clip.build_zero_shot_classifier(
        model,
        tokenizer,
        list(class_names),
        list(templates),
        num_classes_per_batch=classes_per_batch,
        device=device,
    )
    return head.float().contiguous()


def release_text_tower(model: torch.nn.Module) -> None:
    """Drop the text tower's modules so its memory is freed once the head is built."""
    for name in ("transformer", "token_embedding", "ln_final", "text"):
        if hasattr(model, name):
            setattr(model, name, None)
    for name in ("positional_embedding", "text_projection"):
        if hasattr(model, name):
            setattr(model, name, None)
