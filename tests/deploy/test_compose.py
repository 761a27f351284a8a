"""docker-compose.yml is valid for docker-compose (checked offline: no Docker engine needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.deployfiles import (
    COMPOSE_FILE,
    SERVICES,
    compose_config,
    image_of,
    need_tool,
    run,
)


def test_compose_file_validates() -> None:
    run([need_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q"])


def test_validator_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a depends_on condition that does not exist is refused."""
    text = COMPOSE_FILE.read_text()
    broken = text.replace("condition: service_healthy", "condition: service_ready", 1)
    assert broken != text
    (tmp_path / "docker-compose.yml").write_text(broken)
    proc = subprocess.run(
        [need_tool("docker-compose"), "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"],
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
