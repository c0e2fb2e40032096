"""`.env.example` lists every setting, each with a one-line comment, and the values compose requires."""

from __future__ import annotations

import re

from tests.deploy.conftest import ENV_EXAMPLE, load_compose, settings_env_names

# A variable line, set or commented out: `NAME=value` or `# NAME=value`.
VARIABLE = re.compile(r"^(?:# )?([A-Z][A-Z0-9_]*)=")


def _documented() -> dict[str, str]:
    """{variable: the comment line just above it}, for every variable line."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    documented = {}
    for previous, line in zip(["", *lines], lines, strict=False):
        match = VARIABLE.match(line)
        if match:
            documented.setdefault(match.group(1), previous)
    return documented


def test_every_setting_is_listed_with_a_comment() -> None:
    documented = _documented()

    missing = settings_env_names() - set(documented)
    assert not missing, f"add these settings to .env.example, each under a one-line comment: {missing}"
    for name in settings_env_names():
        comment = documented[name]
        assert comment.startswith("# "), f"{name} has no comment above it"
        assert not VARIABLE.match(comment), f"{name} has no comment of its own above it"


def test_every_variable_compose_requires_is_given_a_value() -> None:
    text = load_compose("docker-compose.yml")
    required = set(re.findall(r"\$\{(\w+):\?", str(text)))
    given = {
        m.group(1) for line in ENV_EXAMPLE.read_text().splitlines() if (m := re.match(r"^(\w+)=.", line))
    }

    assert required
    assert required <= given
