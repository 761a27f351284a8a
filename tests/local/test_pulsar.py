"""The local broker is a real Apache Pulsar of the pinned version (integration)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

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


def test_a_disk_a_bookie_would_stop_writing_on_is_named_with_the_fix() -> None:
    where = Path("/data")
    assert local_pulsar.disk_note(100 * 2**30, 50 * 2**30, where) is None
    assert local_pulsar.disk_note(0, 0, where) is None
    note = local_pulsar.disk_note(100 * 2**30, 7 * 2**30, where)  # 93% used: BookKeeper warns
    assert note is not None
    assert "/data is 93.0% used (7.0 GiB free)" in note
    assert "no writes past 95%" in note and "below 90%" in note and "free some space" in note
