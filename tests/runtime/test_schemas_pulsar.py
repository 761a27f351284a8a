"""Each schema round-trips through a real Pulsar topic (integration)."""

from __future__ import annotations

import pulsar
import pytest

from carom import schemas
from carom_local.pulsar import Broker
from carom_runtime.config import PulsarSettings
from carom_runtime.pulsar_io import Publisher, make_client, make_producer
from tests.carom.test_schemas import centroid, error, truth

pytestmark = pytest.mark.integration


def test_every_schema_round_trips_through_a_topic(pulsar_broker: Broker, topic: str) -> None:
    settings = PulsarSettings(url=pulsar_broker.service_url)
    client = make_client(settings)
    try:
        consumer = client.subscribe(topic, "rt", initial_position=pulsar.InitialPosition.Earliest)
        publisher = Publisher(make_producer(client, topic, settings), max_in_flight=100)
        sent: list[schemas.Message] = [
            truth(),
            centroid(),
            centroid(detected=False, x=None, y=None),
            error(),
            error(status="missed", x=None, y=None, l2=None),
            schemas.TrackerStatus(tracker="t-1", t_ns=1, interval_ms=1000),
        ]
        for msg in sent:
            assert publisher.publish(schemas.encode(msg), key="s-1")
        assert publisher.drain(timeout=10)
        assert (publisher.acked, publisher.failed, publisher.dropped) == (len(sent), 0, 0)
        got = []
        for _ in sent:
            m = consumer.receive(10_000)
            got.append(schemas.decode_any(m.data()))
            assert m.partition_key() == "s-1"
            consumer.acknowledge(m)
        assert got == sent
    finally:
        client.close()


def test_publisher_bounds_what_is_in_flight(pulsar_broker: Broker, topic: str) -> None:
    settings = PulsarSettings(url=pulsar_broker.service_url)
    client = make_client(settings)
    try:
        publisher = Publisher(make_producer(client, topic, settings), max_in_flight=5)
        data = schemas.encode(truth())
        results = [publisher.publish(data, "s-1") for _ in range(1000)]
        # The broker cannot confirm 1000 messages before this tight loop ends: most are refused,
        # counted, and never more than 5 are outstanding.
        assert publisher.dropped == results.count(False) > 0
        assert publisher.drain(timeout=10)
        assert publisher.acked == results.count(True) == publisher.sent
    finally:
        client.close()
