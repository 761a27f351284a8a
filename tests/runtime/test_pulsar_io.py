"""Pulsar glue: a logger filtered in C++, and a publisher that spools rather than drop."""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pulsar
import pytest

from carom_local.pulsar import Broker
from carom_runtime.config import PulsarSettings
from carom_runtime.pulsar_io import (
    STILL_DOWN_EVERY_S,
    AdminUnreachable,
    LinkWatch,
    Publisher,
    Spool,
    Stuck,
    admin_path,
    connect_at_start,
    make_client,
    make_producer,
    make_publisher,
    quiet_logger,
    raw_consumer,
    take_queued,
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


def test_at_start_pulsar_is_tried_again_until_the_start_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    failures: list[Exception] = [pulsar.Timeout("starting"), AdminUnreachable("no admin yet")]

    def connect() -> str:
        if failures:
            raise failures.pop(0)
        return "connected"

    assert connect_at_start(PulsarSettings(start_timeout_s=60), connect, "svc") == "connected"
    assert not failures
    failures.append(pulsar.Timeout("down"))
    with pytest.raises(pulsar.Timeout):  # 0: one attempt only
        connect_at_start(PulsarSettings(start_timeout_s=0), connect, "svc")


def test_stuck_says_replace_once_a_producer_stays_down_long_enough() -> None:
    stuck = Stuck(after_s=30)
    assert not stuck.observe(True, 0)
    assert not stuck.observe(False, 10)  # down from 10 s
    assert not stuck.observe(False, 39.9)
    assert not stuck.observe(True, 40)  # back: the clock starts again
    assert not stuck.observe(False, 50)
    assert not stuck.observe(False, 79)
    assert stuck.observe(False, 80)  # 30 s down without a break
    assert not stuck.observe(False, 81)  # its replacement gets 30 s of its own
    assert not stuck.observe(False, 109)
    assert stuck.observe(False, 110)


def test_a_replaced_producer_stores_each_message_once_and_in_order(
    pulsar_broker: Broker, topic: str, tmp_path: Path
) -> None:
    """Producers replaced twice mid-stream on a partitioned topic: each message stored once.

    What a replacement sends again includes messages the broker had already stored (their
    confirmations arrive for the old producer and are ignored): only the broker's
    deduplication, by producer name and the sequence ids Publisher set, keeps them single.
    """
    url = f"{pulsar_broker.admin_url}/admin/v2/{admin_path(topic)}/partitions"
    req = urllib.request.Request(url, data=b"4", method="PUT")
    req.add_header("Content-Type", "application/json")
    urllib.request.urlopen(req, timeout=10).close()
    settings = PulsarSettings(
        url=pulsar_broker.service_url,
        admin_url=pulsar_broker.admin_url,
        spool_dir=str(tmp_path),
    )
    client = make_client(settings)
    try:
        consumer = client.subscribe(topic, "rp", initial_position=pulsar.InitialPosition.Earliest)
        publisher = make_publisher(client, topic, settings, "replace-test")
        name = publisher.producer.producer_name()
        n, keys = 0, 7
        for _ in range(2):
            for _ in range(3000):  # a burst: thousands in flight when the producer goes
                assert publisher.publish(str(n).encode(), f"k{n % keys}")
                n += 1
            assert publisher.replace()
            assert publisher.producer.producer_name() == name  # the name deduplication keys on
        for _ in range(1000):
            assert publisher.publish(str(n).encode(), f"k{n % keys}")
            n += 1
        assert publisher.drain(timeout=60), (publisher.queued, publisher.last_error)
        assert publisher.replacements == 2 and publisher.resent > 0
        assert (publisher.acked, publisher.failed, publisher.dropped) == (n, 0, 0)
        # Stored entries, by message id: a subscription may deliver one entry twice (its
        # connection closed while the broker could not yet tell a duplicate: at-least-once).
        stored: dict[int, set[str]] = {}
        last: dict[int, int] = {}
        out_of_order = 0
        while True:
            try:
                m = consumer.receive(3000)
            except pulsar.Timeout:
                break
            consumer.acknowledge(m)
            v, entry = int(m.data()), str(m.message_id())
            if entry in stored.setdefault(v, set()):
                continue  # delivered again, stored once
            stored[v].add(entry)
            out_of_order += last.get(v % keys, -1) > v
            last[v % keys] = v
        assert [v for v, entries in stored.items() if len(entries) > 1] == []
        assert sorted(stored) == list(range(n))
        assert out_of_order == 0
        publisher.close()
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


def test_the_raw_consumer_receives_and_acks_what_the_wrapper_would(
    pulsar_broker: Broker, topic: str
) -> None:
    """``raw_consumer`` (the tracker's hot loop) on the pinned client: its messages have the
    wrapper's accessors and values, and an ack by message id sticks (nothing comes back)."""
    client = make_client(PulsarSettings(url=pulsar_broker.service_url))
    try:
        consumer = client.subscribe(topic, "raw", consumer_type=pulsar.ConsumerType.KeyShared)
        producer = client.create_producer(topic)
        for i in range(5):
            producer.send(b"m%d" % i, partition_key="k", event_timestamp=1000 + i)
        raw = raw_consumer(consumer)
        msgs = take_queued(raw, raw.receive(10_000), 10)
        while len(msgs) < 5:
            msgs += take_queued(raw, raw.receive(10_000), 10)
        assert [m.data() for m in msgs] == [b"m%d" % i for i in range(5)]
        assert [m.event_timestamp() for m in msgs] == [1000 + i for i in range(5)]
        assert all(m.publish_timestamp() > 0 for m in msgs)
        mid = msgs[0].message_id()
        assert (mid.ledger_id(), mid.entry_id()) >= (0, 0) and mid.partition() == -1
        for m in msgs:
            raw.acknowledge(m.message_id())
        consumer.close()
        again = client.subscribe(topic, "raw", consumer_type=pulsar.ConsumerType.KeyShared)
        with pytest.raises(pulsar.Timeout):
            again.receive(1500)  # every message was acked
    finally:
        client.close()
