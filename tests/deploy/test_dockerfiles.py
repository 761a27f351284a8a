"""The Dockerfiles build what the deployments expect, checked without a Docker engine: hadolint
passes, every COPY source exists and reaches the build context, the image runs its service as a
non-root user with a healthcheck on the configured port, and installs wheels only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.deploy.deployfiles import (
    ROOT,
    SERVICES,
    Container,
    Service,
    command_problems,
    image_files,
    need_tool,
    parse_dockerfile,
    run,
    settings_of,
)

DOCKERIGNORE = ROOT / ".dockerignore"


def _pattern(p: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match, plus ``**``) as a regex on a path."""
    out = ""
    i = 0
    while i < len(p):
        if p.startswith("**", i):
            out += ".*"
            i += 2
        elif p[i] == "*":
            out += "[^/]*"
            i += 1
        elif p[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(p[i])
            i += 1
    return re.compile(out + "$")


def ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching rule wins; a rule
    matches a path or any folder above it)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keep = line.startswith("!")
            rules.append((keep, _pattern(line.lstrip("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for keep, rx in rules:
        if any(rx.match(p) for p in prefixes):
            out = not keep
    return out


def test_dockerignore_matcher() -> None:
    assert ignored(".venv/bin/python")
    assert ignored("local/.pulsar/data/x")
    assert ignored("metrics/run/s.csv")
    assert ignored("carom/__pycache__/x.pyc")
    assert not ignored("carom/config.py")
    assert not ignored("local/carom_local/pulsar.py")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_hadolint_passes(name: str) -> None:
    run([need_tool("hadolint"), str(SERVICES[name].dockerfile)])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_copy_sources_reach_the_build_context(name: str) -> None:
    for stage in parse_dockerfile(SERVICES[name].dockerfile):
        for src in stage.copy_sources:
            path = ROOT / src
            assert path.exists(), f"{src} does not exist"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not ignored(rel), f"{rel} is left out by .dockerignore"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_image_runs_the_service_as_configured(name: str) -> None:
    service: Service = SERVICES[name]
    stages = parse_dockerfile(service.dockerfile)
    final = stages[-1]
    # Same Python as the virtualenv the lock was made in, slim, in every stage.
    wanted = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    assert all(s.base.startswith(wanted) for s in stages), [s.base for s in stages]
    # Non-root, by number (Kubernetes' runAsNonRoot can only verify a numeric user).
    uid = final.user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    c = Container(
        str(service.dockerfile),
        service,
        final.entrypoint + final.cmd,
        final.env,
        image_files(final),
    )
    assert command_problems(c.where, service, c.argv) == []
    s = settings_of(c)  # the image alone starts with valid settings
    assert s.http.host == "0.0.0.0"  # reachable from outside the container
    wanted_ports = {f"{s.http.port}/tcp"}
    if name == "router":
        wanted_ports.add(f"{s.webtransport.port}/udp")
        assert "0.0.0.0" in s.webtransport.hosts
        assert s.page in c.files, "the router's page is not in the image"
    assert final.exposed == wanted_ports
    check = " ".join(final.healthcheck)
    assert f"http://127.0.0.1:{s.http.port}/health" in check


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_wheels_only(name: str) -> None:
    """Dependencies come as binary wheels at the lock's versions; the image installs offline."""
    text = SERVICES[name].dockerfile.read_text()
    assert "--only-binary=:all:" in text
    assert "--constraint requirements.lock" in text
    assert "--no-index" in text
    assert Path(ROOT / "requirements.lock").exists()
