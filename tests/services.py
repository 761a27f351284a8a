"""Start Carom services as real subprocesses for integration tests, and stop them cleanly; wait
for a condition with a deadline (`wait_until`); read their metrics (`scrape`, `metric`)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from carom.signaling import auth_headers

T = TypeVar("T")


def _timed_out(what: str | Callable[[], str], timeout: float) -> AssertionError:
    said = what() if callable(what) else what
    return AssertionError(f"not within {timeout:g} s: {said}")


def wait_until(
    condition: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float = 30.0,
    every: float = 0.1,
) -> T:
    """Poll ``condition`` until it gives something true, and return that.

    The last look is at the deadline, ``timeout`` seconds on (never later, so a wait in place of a
    sleep of that length is as strict); then fail, naming ``what`` did not happen. ``what`` may be
    a callable, to tell the state the condition last saw.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(what, timeout)
        time.sleep(min(every, left))


async def wait_until_async(
    condition: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float = 30.0,
    every: float = 0.1,
) -> T:
    """:func:`wait_until` inside an event loop: the loop runs on between polls."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(what, timeout)
        await asyncio.sleep(min(every, left))


@dataclass(frozen=True)
class Metrics:
    """One read of a service's ``/metrics``, parsed by prometheus_client's own parser."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        return cls(tuple(s for f in text_string_to_metric_families(text) for s in f.samples))

    def get(self, name: str, /, default: float | None = None, **labels: str) -> float:
        """The sample ``name`` (``_total`` included for a counter) whose labels are exactly
        ``labels``; ``default`` when there is none (None: fail, naming it)."""
        for s in self.samples:
            if s.name == name and s.labels == labels:
                return s.value
        if default is None:
            raise AssertionError(f"no sample {name}{labels or ''} in /metrics")
        return default

    def by(self, name: str, label: str) -> dict[str, float]:
        """Every sample ``name``, keyed by its ``label``'s value."""
        return {s.labels[label]: s.value for s in self.samples if s.name == name}


def scrape(url: str) -> Metrics:
    """The service at ``url``'s metrics, now."""
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200, r.text
    return Metrics.parse(r.text)


def metric(url: str, name: str, /, default: float | None = None, **labels: str) -> float:
    """One sample of the service at ``url``'s metrics (see :meth:`Metrics.get`)."""
    return scrape(url).get(name, default, **labels)


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
