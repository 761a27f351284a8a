"""Shared fixtures: a real Apache Pulsar broker for every integration test.

The broker comes from ``local/pulsar`` (Maven-assembled Apache Pulsar, started on first use and
stopped at the end of the session if this session started it), or from ``PULSAR_URL``. There is no
stand-in: if no broker can be had, the tests that need one fail with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from carom_local import pulsar as local_pulsar


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the broker, directly or through another fixture, ``integration``.

    So ``-m "not integration"`` (``./local/test --fast``) can never start Pulsar by accident: the
    mark follows the fixture, not a list someone has to keep up to date.
    """
    for item in items:
        if "pulsar_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pulsar_broker() -> Iterator[local_pulsar.Broker]:
    try:
        broker = local_pulsar.start(timeout=300, quiet=True)
    except local_pulsar.PulsarError as exc:
        pytest.fail(f"no Apache Pulsar broker for the integration tests: {exc}", pytrace=False)
    yield broker
    if broker.started_here:
        local_pulsar.stop(quiet=True)


@pytest.fixture
def topic() -> str:
    """A fresh topic per test, so tests never see each other's messages."""
    return f"persistent://public/default/test-{uuid.uuid4().hex[:12]}"
