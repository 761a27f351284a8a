"""Start Carom services as real subprocesses for integration tests, and stop them cleanly."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from carom.signaling import auth_headers


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: One random token per test session: every simulator the tests start requires it, and every
#: router they start sends it (the simulator's session API answers the router only).
SIMULATOR_TOKEN = secrets.token_urlsafe(32)
#: The headers of a request to a simulator's session API (offer, list, delete).
SIMULATOR_AUTH = auth_headers(SIMULATOR_TOKEN)
#: Where each service reads that token from (carom_runtime.config.env_var).
TOKEN_ENV = {
    "carom_simulator": "CAROM_SIMULATOR__ACCESS__TOKEN",
    "carom_router": "CAROM_ROUTER__SIMULATOR__TOKEN",
}


@dataclass
class Running:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    #: What a request to this service's protected API carries (the simulator's token).
    headers: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def service(
    module: str,
    args: list[str],
    http_port: int,
    log: Path,
    healthy: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[Running]:
    """Run ``python -m module args``; wait for /health (200, or any answer if not ``healthy``).

    The simulator gets ``SIMULATOR_TOKEN`` as its access token and the router sends it, through
    their env (never a flag, which `ps` shows); ``env`` adds to or overrides that.
    """
    token_env = {TOKEN_ENV[module]: SIMULATOR_TOKEN} if module in TOKEN_ENV else {}
    full_env = {**os.environ, **token_env, **(env or {})}
    token = full_env.get(TOKEN_ENV["carom_simulator"]) if module == "carom_simulator" else None
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--http-port", str(http_port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=full_env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{module} exited at start:\n{log.read_text()[-4000:]}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200 or not healthy:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{module} not healthy after 60 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    running = Running(url, proc, log, auth_headers(token or ""))
    try:
        yield running
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{module} did not stop within 30 s of SIGTERM")
        # uvicorn re-raises the signal it caught once its shutdown is complete.
        assert rc in (0, -signal.SIGTERM), running.text()[-3000:]
        assert "Traceback" not in running.text(), running.text()[-3000:]
