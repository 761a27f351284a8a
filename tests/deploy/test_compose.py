"""docker-compose.yml is valid for docker-compose (checked offline: no Docker engine needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.deployfiles import (
    COMPOSE_FILE,
    COMPOSE_TOKEN,
    COMPOSE_TOKEN_VAR,
    SERVICES,
    compose_config,
    image_of,
    need_tool,
    run,
)

#: As a user runs it: with the simulator's token in the environment (or in .env).
WITH_TOKEN = ["env", f"{COMPOSE_TOKEN_VAR}={COMPOSE_TOKEN}"]


def test_compose_file_validates() -> None:
    run([*WITH_TOKEN, need_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q"])


def test_no_token_stops_compose_before_anything_starts(tmp_path: Path) -> None:
    """Without CAROM_SIMULATOR_TOKEN, every docker-compose command says what to set."""
    proc = subprocess.run(
        ["env", "-u", COMPOSE_TOKEN_VAR, need_tool("docker-compose"),
         "--project-directory", str(tmp_path), "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"set {COMPOSE_TOKEN_VAR}" in proc.stderr, proc.stderr


def test_validator_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a depends_on condition that does not exist is refused."""
    text = COMPOSE_FILE.read_text()
    broken = text.replace("condition: service_healthy", "condition: service_ready", 1)
    assert broken != text
    (tmp_path / "docker-compose.yml").write_text(broken)
    exe = need_tool("docker-compose")
    proc = subprocess.run(
        [*WITH_TOKEN, exe, "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "service_ready" in proc.stderr


def test_every_service_has_a_healthcheck() -> None:
    """depends_on service_healthy needs one: Pulsar's in compose, the others' in their image."""
    services = compose_config()["services"]
    assert "test" in services["pulsar"]["healthcheck"]
    for service in SERVICES.values():
        assert image_of(service).healthcheck, f"{service.dockerfile} has no HEALTHCHECK"
