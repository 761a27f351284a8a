"""Pulsar glue: a logger filtered in C++, and a publisher that spools rather than drop."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pulsar
import pytest

from carom_local.pulsar import Broker
from carom_runtime.config import PulsarSettings
from carom_runtime.pulsar_io import (
    STILL_DOWN_EVERY_S,
    LinkWatch,
    Publisher,
    Spool,
    make_client,
    make_producer,
    quiet_logger,
)


def test_quiet_logger_filters_in_cpp() -> None:
    # A Python logger would be called for every DEBUG line (~10 per message; measured).
    warn = quiet_logger()
    assert isinstance(warn, pulsar.ConsoleLogger)
    assert warn.log_level == pulsar.LoggerLevel.Warn
    err = quiet_logger(logging.ERROR)
    assert isinstance(err, pulsar.ConsoleLogger) and err.log_level == pulsar.LoggerLevel.Error
    silent = quiet_logger(100)
    assert isinstance(silent, pulsar.FileLogger) and silent.log_file == os.devnull


def test_spool_is_a_fifo_that_empties_its_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "t/1", max_bytes=200)
    assert spool.path.parent == tmp_path and "/" not in spool.path.name
    assert spool.append(b"a" * 10, "k1", 5) and spool.append(b"", "k2")
    assert spool.records == 2 and spool.size == 16 + 2 + 10 + 16 + 2
    assert spool.pop() == (b"a" * 10, "k1", 5)
    assert spool.append(b"c", "k3", 7)  # appended while part-read
    assert [spool.pop(), spool.pop(), spool.pop()] == [(b"", "k2", 0), (b"c", "k3", 7), None]
    assert spool.path.stat().st_size == 0  # read to its end: the file starts again
    assert not spool.append(b"x" * 300, "k")  # over its bound: refused, for the caller to count
    assert spool.records == 0 and spool.total == 3
    spool.close()
    assert not spool.path.exists()


def test_publisher_spools_past_its_memory_bound_and_keeps_order(
    pulsar_broker: Broker, topic: str, tmp_path: Path
) -> None:
    """With 5 in flight at most, 2,000 messages published at once all arrive, in order."""
    settings = PulsarSettings(url=pulsar_broker.service_url, max_pending_messages=5)
    client = make_client(settings)
    try:
        consumer = client.subscribe(topic, "sp", initial_position=pulsar.InitialPosition.Earliest)
        publisher = Publisher(
            make_producer(client, topic, settings),
            max_in_flight=5,
            spool=Spool(tmp_path, "test", 1 << 20),
        )
        t0_ms = time.time_ns() // 1_000_000
        assert all(publisher.publish(str(i).encode(), f"k{i % 3}") for i in range(2000))
        t1_ms = time.time_ns() // 1_000_000  # before most of the spool has been sent
        assert publisher.spool is not None and publisher.spool.total > 1000  # most went to disk
        assert publisher.drain(timeout=30), (publisher.queued, publisher.last_error)
        assert (publisher.acked, publisher.failed, publisher.dropped) == (2000, 0, 0)
        got, accepted = [], []
        for _ in range(2000):
            m = consumer.receive(10_000)
            got.append(int(m.data()))
            accepted.append(m.event_timestamp())
            consumer.acknowledge(m)
        assert got == list(range(2000))
        # Each carries when it was accepted, not when it left the spool: in order, from t0.
        assert t0_ms <= accepted[0] and accepted == sorted(accepted) and accepted[-1] <= t1_ms
        publisher.close()
        assert not publisher.spool.path.exists()
    finally:
        client.close()


class Producer:  # a stand-in handle for LinkWatch: its class name is its kind in the log
    def __init__(self, topic: str) -> None:
        self._topic = topic
        self.up = True

    def topic(self) -> str:
        return self._topic

    def is_connected(self) -> bool:
        return self.up


def test_a_link_down_for_long_names_the_handles_still_down(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = Producer("persistent://public/default/a"), Producer("persistent://public/default/b")
    changes: list[bool] = []
    handles: list[Any] = [a, b]
    watch = LinkWatch("svc", lambda: handles, on_change=lambda up, _: changes.append(up))
    caplog.set_level(logging.WARNING)
    watch.check()
    assert watch.up and not caplog.records
    a.up = b.up = False
    watch.check()
    assert changes == [False] and "Pulsar broker lost" in caplog.records[-1].getMessage()
    b.up = True  # one back, one not: the link stays down
    watch.check()
    assert len(caplog.records) == 1  # nothing new within STILL_DOWN_EVERY_S
    clock = time.monotonic() + STILL_DOWN_EVERY_S + 1
    monkeypatch.setattr(time, "monotonic", lambda: clock)
    watch.check()
    said = caplog.records[-1].getMessage()
    assert (
        "still down after" in said
        and "not connected: producer persistent://public/default/a" in said
    )
    assert "default/b" not in said
    watch.check()
    assert len(caplog.records) == 2  # named once per interval
    a.up = True
    watch.check()
    assert changes == [False, True] and "back after" in caplog.records[-1].getMessage()
