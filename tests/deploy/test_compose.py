"""docker-compose files: valid for docker-compose, and every command, setting and volume they name exists.

Nothing here starts a container (this machine has no container engine); `docker-compose config -q`
checks what compose itself checks, and the rest checks the files against the code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import COMPOSE_CHECKS, REPO, load_compose, settings_env_names
from worker.celery_app import GPU_QUEUE

DOCKER_COMPOSE = shutil.which("docker-compose")
OUR_IMAGES = ("must-api", "must-worker", "must-inference")
SERVICES = load_compose("docker-compose.yml")["services"]
ALL_SERVICES = [
    (path, name, service)
    for files, _ in COMPOSE_CHECKS
    for path in files
    for name, service in load_compose(path)["services"].items()
]
# The one-shot services; everything else runs until stopped and needs a health check.
ONE_SHOTS = {"migrate", "minio-init"}


def _compose_env(**extra: str) -> dict[str, str]:
    """A clean environment for docker-compose: no stray COMPOSE_* or MUST_* from the test run."""
    keep = {key: value for key, value in os.environ.items() if not key.startswith(("COMPOSE_", "MUST_"))}
    return keep | extra


def _compose_config(
    files: list[str], env: dict[str, str], *, env_file: bool = True
) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    command = [DOCKER_COMPOSE]
    for path in files:
        command += ["-f", str(REPO / path)]
    if env_file:
        command += ["--env-file", str(REPO / ".env.example")]
    return subprocess.run(
        [*command, "config", "-q"],
        capture_output=True,
        text=True,
        env=_compose_env(**env),
        cwd=REPO,
        timeout=60,
    )


def test_every_compose_file_in_the_repository_is_checked() -> None:
    found = {p.relative_to(REPO).as_posix() for p in REPO.glob("docker-compose*.yml")}
    found |= {p.relative_to(REPO).as_posix() for p in (REPO / "deploy").rglob("*.yml")}
    checked = {path for files, _ in COMPOSE_CHECKS for path in files}
    assert found == checked


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose is not installed (.ci/run installs it)")
@pytest.mark.parametrize(("files", "env"), COMPOSE_CHECKS, ids=["+".join(f) for f, _ in COMPOSE_CHECKS])
def test_docker_compose_accepts_the_file_with_the_example_env(files: list[str], env: dict[str, str]) -> None:
    result = _compose_config(files, env)

    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose is not installed (.ci/run installs it)")
def test_secrets_must_be_set_there_are_no_default_passwords() -> None:
    result = _compose_config(["docker-compose.yml"], {}, env_file=False)

    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), "commands are written in exec form"
    return [str(part) for part in command]


def _ours(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith(OUR_IMAGES)


def _uvicorn_apps() -> set[str]:
    return {
        command[1]
        for _, _, service in ALL_SERVICES
        if _ours(service) and (command := _command(service))[0] == "uvicorn"
    }


@pytest.mark.parametrize("app", sorted(_uvicorn_apps()))
def test_uvicorn_commands_name_an_app_factory_that_exists(app: str) -> None:
    module, _, attribute = app.partition(":")
    code = f"import {module} as m; f = getattr(m, {attribute!r}); assert callable(f), 'not callable'"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )

    assert result.returncode == 0, result.stderr
    for path, name, service in ALL_SERVICES:
        command = _command(service) if _ours(service) else []
        if command[:2] == ["uvicorn", app]:
            assert "--factory" in command, f"{path}:{name} serves a factory without --factory"


def test_worker_commands_start_celery_on_the_gpu_queue(tmp_path: Path) -> None:
    workers = [(p, n, _command(s)) for p, n, s in ALL_SERVICES if _ours(s) and _command(s)[0] == "celery"]
    assert workers
    for path, name, command in workers:
        assert command[1:4] == ["-A", "worker.celery_app", "worker"], f"{path}:{name}"
        assert command[command.index("-Q") + 1] == GPU_QUEUE, f"{path}:{name}"
        assert command[command.index("--concurrency") + 1] == "1", f"{path}:{name}: one job per GPU"
    # The worker's own CLI loads the app named by -A and validates the options.
    celery = Path(sys.executable).parent / "celery"
    env = {**_compose_env(), "MUST_BROKER__URL": "redis://127.0.0.1:6379/15"}
    result = subprocess.run(
        [str(celery), *workers[0][2][1:], "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--concurrency" in result.stdout


def test_the_migrate_command_migrates_a_fresh_postgres_database(pg_url: str) -> None:
    command = _command(SERVICES["migrate"])
    assert command == ["sh", "deploy/prestart.sh"]
    env = _compose_env(MUST_DATABASE__URL=pg_url, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "database at the newest migration" in result.stdout
    from sqlalchemy import create_engine, inspect

    engine = create_engine(pg_url)
    try:
        assert {"jobs", "alembic_version"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_every_must_variable_is_a_setting_and_every_setting_can_be_set() -> None:
    known = settings_env_names()
    for path, name, service in ALL_SERVICES:
        environment = service.get("environment") or {}
        unknown = {key for key in environment if key.startswith("MUST_")} - known
        assert not unknown, f"{path}:{name} sets MUST_* variables that no Settings field reads: {unknown}"
    # Every setting is passed through, so a value in .env reaches the containers.
    shared = load_compose("docker-compose.yml")["x-must-env"]
    missing = known - set(shared)
    assert not missing, f"add these settings to x-must-env in docker-compose.yml (as ${{NAME:-}}): {missing}"


def test_long_running_services_have_health_checks_and_dependencies_wait_for_health() -> None:
    for name, service in SERVICES.items():
        if name not in ONE_SHOTS:
            assert "healthcheck" in service, f"{name} has no health check"
            assert service.get("restart") == "unless-stopped", name
        for dependency, condition in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            assert condition == {"condition": wanted}, f"{name} -> {dependency}"


def test_services_use_named_volumes_and_pinned_images() -> None:
    compose = load_compose("docker-compose.yml")
    declared = set(compose["volumes"])
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source in declared, f"{name} mounts {source!r}, which is not a named volume"
        image = str(service["image"])
        if not _ours(service):
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: pin the tag of {image!r}"
            assert not image.endswith(":latest"), name


def test_gpu_services_reserve_one_nvidia_gpu_and_have_cpu_twins() -> None:
    for name in ("worker", "inference"):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        twin = SERVICES[f"{name}-cpu"]
        assert "deploy" not in twin
        assert twin["profiles"] == ["cpu"]
        assert _command(twin) == _command(SERVICES[name])
    override = load_compose("docker-compose.cpu.yml")["services"]
    assert override == {"worker": {"profiles": ["gpu"]}, "inference": {"profiles": ["gpu"]}}


def test_dockerfile_commands_match_the_compose_commands() -> None:
    for dockerfile, service in (("api", "api"), ("worker", "worker"), ("inference", "inference")):
        text = (REPO / "deploy" / "docker" / f"{dockerfile}.Dockerfile").read_text()
        cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
        compose = _command(SERVICES[service])
        assert compose[: len(cmd)] == cmd, f"{dockerfile}.Dockerfile CMD differs from the compose command"


SECRETS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "FLOWER_PASSWORD", "MUST_API_KEYS")


def test_no_secret_is_put_on_a_command_line() -> None:
    for path, name, service in ALL_SERVICES:
        command = " ".join(str(part) for part in service.get("command") or [])
        for secret in SECRETS:
            # `$$NAME` is the container's own variable, expanded inside it; `${NAME...}` is the value.
            assert "${" + secret not in command, f"{path}:{name} puts {secret} on its command line"


def test_flower_asks_for_a_password_that_must_be_set() -> None:
    flower = SERVICES["flower"]
    auth = str(flower["environment"]["FLOWER_BASIC_AUTH"])

    assert "${FLOWER_PASSWORD:?" in auth
    assert "CELERY_BROKER_URL" in flower["environment"]


def test_worker_health_checks_probe_the_configured_port() -> None:
    workers = [(p, n, s) for p, n, s in ALL_SERVICES if str(s.get("image", "")).startswith("must-worker")]
    assert workers
    for path, name, service in workers:
        test = service["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "worker.healthcheck"], f"{path}:{name}"
        assert "9808" not in json.dumps(service["healthcheck"])


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_the_redis_command_keeps_the_password_off_the_process_list(tmp_path: Path) -> None:
    from services.launcher import free_port

    script = _command(SERVICES["redis"])
    assert script[:2] == ["sh", "-c"]
    port = free_port()
    # As the container runs it ($$ is compose's escape for $), on a port and file of the test's own.
    line = script[2].replace("$$", "$").replace("/tmp/redis.conf", str(tmp_path / "redis.conf"))
    line = (
        line.replace("exec redis-server", "exec redis-server") + f" --port {port} --bind 127.0.0.1 --save ''"
    )
    line = line.replace("appendonly yes", "appendonly no")
    password = "s3cret-pass"
    proc = subprocess.Popen(["sh", "-c", line], env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password})
    try:
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                assert redis.Redis(port=port, password=password, socket_timeout=2).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).get("x")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
    finally:
        proc.terminate()
        proc.wait(timeout=10)
