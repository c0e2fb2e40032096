"""What the deployment tests share: the repository's compose files, parsed, and the settings' env names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from services.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("*.Dockerfile"))
# Every compose file and how to check it: override files only make sense on top of their base.
COMPOSE_CHECKS: list[tuple[list[str], dict[str, str]]] = [
    (["docker-compose.yml"], {}),
    (["docker-compose.yml", "docker-compose.cpu.yml"], {}),
    (["deploy/compose/worker-node.yml"], {"MAIN_HOST": "10.0.0.5"}),
]


def settings_env_names() -> set[str]:
    """The environment variable of every Settings field: MUST_FIELD, or MUST_GROUP__FIELD when nested."""
    names = set()
    for name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names |= {f"MUST_{name}__{sub}".upper() for sub in group.model_fields}
        else:
            names.add(f"MUST_{name}".upper())
    return names


def load_compose(relative: str) -> dict[str, Any]:
    """A compose file as YAML data (anchors and merge keys resolved; `${...}` left as written)."""
    data: dict[str, Any] = yaml.safe_load((REPO / relative).read_text())
    return data
