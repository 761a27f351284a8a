"""The local broker is a real Apache Pulsar of the pinned version (integration)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from carom_local import pulsar as local_pulsar

pytestmark = pytest.mark.integration


def test_broker_is_apache_pulsar_of_the_pinned_version(
    pulsar_broker: local_pulsar.Broker,
) -> None:
    with urllib.request.urlopen(f"{pulsar_broker.admin_url}/admin/v2/brokers/version") as r:
        version = r.read().decode().strip().strip('"')
    assert version == local_pulsar.PULSAR_VERSION == "4.0.7"
    # Only Apache Pulsar's admin API answers these with a standalone cluster and its namespace.
    with urllib.request.urlopen(f"{pulsar_broker.admin_url}/admin/v2/clusters") as r:
        assert "standalone" in json.loads(r.read())
    with urllib.request.urlopen(f"{pulsar_broker.admin_url}/admin/v2/namespaces/public") as r:
        assert "public/default" in json.loads(r.read())


def test_status_reports_ready(pulsar_broker: local_pulsar.Broker) -> None:
    ok, text = local_pulsar.status()
    assert ok, text
    assert "4.0.7" in text


def test_pom_and_compose_pin_the_same_version() -> None:
    pom = (local_pulsar.DIST_DIR / "pom.xml").read_text()
    assert f"<pulsar.version>{local_pulsar.PULSAR_VERSION}</pulsar.version>" in pom
