"""Which CLIP a job or a zero-shot request starts from; a plain description that imports no model code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to start from.

    - `arch` alone with `pretrained`: an open_clip architecture and pretrained tag (the tag's
      weights come from open_clip's cache or hub).
    - `arch` with `checkpoint`: an open_clip architecture and a local weights file.
    - `config` with `checkpoint`: a custom open_clip model config (a JSON file path or a dict).
    - `arch` alone: random weights, only meant for benchmarks.

    `arch` must be one of open_clip's built-in architectures and `pretrained` one of its tags for
    that architecture (never a path or an `hf-hub:` name). A tag's weights come from the local
    Hugging Face cache; only with `allow_download` are they fetched from the hub, and a fetch that
    makes no progress for `download_timeout` seconds fails.
    """

    arch: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    config: str | dict[str, Any] | None = field(default=None, hash=False)
    allow_download: bool = True
    download_timeout: float = 60.0

    def describe(self) -> str:
        """A short human-readable name for logs and manifests."""
        name = self.arch or (self.config if isinstance(self.config, str) else "custom-config")
        source = self.pretrained or self.checkpoint or "random-init"
        return f"{name} ({source})"
