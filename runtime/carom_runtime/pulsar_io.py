"""Thin Pulsar glue shared by the services: one way to make clients, producers and to publish.

Hot paths publish with the sync client's ``send_async`` + callback (measured here: ~33k msg/s from
an asyncio loop, vs ~15k for ``pulsar.asyncio``); the callback runs on the client's I/O thread
and only touches counters, so the event loop never blocks on Pulsar.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pulsar

from carom_runtime.config import PulsarSettings

_LEVELS = {
    logging.DEBUG: pulsar.LoggerLevel.Debug,
    logging.INFO: pulsar.LoggerLevel.Info,
    logging.WARNING: pulsar.LoggerLevel.Warn,
    logging.ERROR: pulsar.LoggerLevel.Error,
}


def quiet_logger(level: int = logging.WARNING) -> object:
    """The C++ client's logger (``pulsar.ConsoleLogger``/``FileLogger``), filtered in C++.

    ``level`` above ERROR: silent.

    Never a Python ``logging.Logger``: the client then calls into Python for every DEBUG line,
    whatever the logger's level. Measured: 10 calls per message received and acked, each taking
    the GIL, which cost the tracker more than its whole join.
    """
    if level > logging.ERROR:
        silent: object = pulsar.FileLogger(pulsar.LoggerLevel.Error, os.devnull)
        return silent
    console: object = pulsar.ConsoleLogger(_LEVELS.get(level, pulsar.LoggerLevel.Warn))
    return console


def make_client(settings: PulsarSettings, logger: object | None = None) -> pulsar.Client:
    return pulsar.Client(
        settings.url,
        operation_timeout_seconds=settings.operation_timeout_s,
        connection_timeout_ms=min(10_000, settings.operation_timeout_s * 1000),
        logger=logger or quiet_logger(),
    )


def make_producer(
    client: pulsar.Client, topic: str, settings: PulsarSettings, name: str | None = None
) -> pulsar.Producer:
    """The one producer configuration every Carom service uses (benchmarked in bench/)."""
    return client.create_producer(
        topic,
        producer_name=name,
        batching_enabled=settings.batching,
        batching_max_publish_delay_ms=settings.batching_max_delay_ms,
        batching_max_messages=settings.batching_max_messages,
        batching_type=pulsar.BatchingType.KeyBased
        if settings.batching_type == "key_based"
        else pulsar.BatchingType.Default,
        max_pending_messages=settings.max_pending_messages,
        block_if_queue_full=False,
        # Never: a message waits in the client, resent after a reconnect, however long the
        # broker is away (an outage of 53 s used to fail 1,801 truths on the 30 s timeout).
        send_timeout_millis=0,
    )


class TopicError(RuntimeError):
    """A topic is not as the configuration says (e.g. its partition count); the service stops."""


def admin_path(topic: str) -> str:
    """``persistent://t/ns/x`` as the admin REST API's path ``persistent/t/ns/x``."""
    scheme, sep, rest = topic.partition("://")
    if not sep or scheme not in ("persistent", "non-persistent") or rest.count("/") != 2:
        raise TopicError(f"{topic!r} is not a full topic name (persistent://tenant/ns/topic)")
    return f"{scheme}/{rest}"


def _admin(
    url: str, method: str = "GET", body: bytes | None = None, timeout: float = 5.0
) -> object:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.strip() else None


def partition_count(admin_url: str, topic: str, timeout: float = 5.0) -> int:
    """How many partitions the broker has for ``topic`` (0: not partitioned, or not there)."""
    got = _admin(f"{admin_url}/admin/v2/{admin_path(topic)}/partitions", timeout=timeout)
    return int(got.get("partitions", 0)) if isinstance(got, dict) else 0


def ensure_topics(settings: PulsarSettings, timeout: float = 5.0) -> None:
    """Create the three topics with ``settings.partitions`` partitions (blocking; at start only).

    Nothing to do with 0 partitions: the broker creates plain topics on first use. Otherwise each
    topic is created partitioned through the admin API before any producer or consumer exists
    (a consumer first would have the broker create it plain). Several services starting at once
    race harmlessly: the broker answers 409 to all but one, and the count is then checked. A
    topic that exists with another count is an error, not something to fix here: changing it
    under a running system would move sessions to other partitions mid-stream.
    """
    want = settings.partitions
    if want == 0:
        return
    topics = settings.topics
    for topic in (topics.truth, topics.centroids, topics.errors):
        url = f"{settings.admin_url}/admin/v2/{admin_path(topic)}/partitions"
        try:
            _admin(url, "PUT", str(want).encode(), timeout)
            continue
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise TopicError(f"cannot create {topic} with {want} partitions: {exc}") from None
        except (OSError, urllib.error.URLError) as exc:
            raise TopicError(f"cannot reach the admin API at {settings.admin_url}: {exc}") from None
        have = partition_count(settings.admin_url, topic, timeout)
        if have != want:
            what = f"{have} partitions" if have else "a non-partitioned topic"
            raise TopicError(
                f"{topic} exists as {what}, the config says pulsar.partitions={want}: "
                "set that, or delete the topic first"
            )


def last_message_ids(
    admin_url: str, topic: str, partitions: int, timeout: float = 1.0
) -> dict[int, tuple[int, int]]:
    """The broker's last message id of each partition: ``{partition: (ledger, entry)}``.

    The client cannot tell it for a partitioned topic (``get_last_message_id`` on a
    multi-partition consumer raises OperationNotSupported), so the admin API is asked, partition
    by partition; it redirects each question to the partition's owning broker.
    """
    out: dict[int, tuple[int, int]] = {}
    for i in range(partitions):
        got = _admin(
            f"{admin_url}/admin/v2/{admin_path(topic)}-partition-{i}/lastMessageId", timeout=timeout
        )
        if not isinstance(got, dict):
            raise TopicError(f"no last message id for {topic}-partition-{i}: {got!r}")
        out[i] = (int(got["ledgerId"]), int(got["entryId"]))
    return out


class Spool:
    """A FIFO of ``(key, payload)`` records in a file: where messages wait once memory is full.

    The broker can be away for longer than any in-memory bound allows (a restart, a network
    split): rather than drop what a service has accepted, ``Publisher`` appends it here and sends
    it, in order, once the broker confirms what is in flight. Records are length-prefixed; the file
    is truncated whenever it has been read to its end, so an outage costs disk only while it lasts.
    Beyond ``max_bytes`` a record is refused (the caller counts it as dropped): a full disk must not
    take the host down with it.

    Not thread-safe on its own: ``Publisher`` calls it under its lock. Not a crash journal either:
    it lives as long as the process (the file is removed on ``close``).
    """

    _HEAD: Final = struct.Struct("<IIQ")  # key length, payload length, event time (ms)

    def __init__(self, directory: str | Path | None, name: str, max_bytes: int) -> None:
        folder = Path(directory) if directory else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        self.path = folder / f"carom-spool-{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}.bin"
        self._file = open(self.path, "w+b")  # noqa: SIM115 - lives as long as the publisher
        self.max_bytes = max_bytes
        self._read_at = 0
        self._write_at = 0
        self.records = 0
        "Records waiting in the file."
        self.total = 0
        "Records ever appended (for the log line that closes an outage)."

    @property
    def size(self) -> int:
        return self._write_at - self._read_at

    def append(self, payload: bytes, key: str, event_ms: int = 0) -> bool:
        k = key.encode()
        size = self._HEAD.size + len(k) + len(payload)
        if self._write_at + size - self._read_at > self.max_bytes:
            return False
        self._file.seek(self._write_at)
        self._file.write(self._HEAD.pack(len(k), len(payload), event_ms) + k + payload)
        self._write_at += size
        self.records += 1
        self.total += 1
        return True

    def pop(self) -> tuple[bytes, str, int] | None:
        """The oldest record: payload, key and event time (ms), or None when empty."""
        if self.records == 0:
            return None
        self._file.flush()
        self._file.seek(self._read_at)
        klen, plen, event_ms = self._HEAD.unpack(self._file.read(self._HEAD.size))
        key = self._file.read(klen).decode()
        payload = self._file.read(plen)
        self._read_at += self._HEAD.size + klen + plen
        self.records -= 1
        if self.records == 0:  # read to its end: start the file again
            self._file.seek(0)
            self._file.truncate()
            self._read_at = self._write_at = 0
        return payload, key, event_ms

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Publisher:
    """Publishing that never blocks the caller and never drops what it accepted.

    Up to ``max_in_flight`` messages wait in the Pulsar client for the broker's confirmation;
    the producer never times them out (``send_timeout_millis=0``), so a broker outage only delays
    them: the client resends them, in order, once it reconnects. What a killed broker had stored
    without its confirmation reaching us is then sent twice: the broker's deduplication
    (``brokerDeduplicationEnabled``, in every broker config Carom ships) stores it once, by the
    producer's sequence ids (tests/faults/test_broker_crash_publish.py).

    Past that bound, with a ``spool``, messages go to disk and follow in order as confirmations
    come in (everything published after the first spooled message is spooled too, so one key's
    messages never overtake each other). Only when the spool is full too (or without one) is a
    message refused: ``publish`` returns False and counts it in ``dropped``. Errors the client
    gives up on land in ``failed``.

    Every message carries the time it was accepted as its Pulsar *event time*: its publish time
    is stamped when it is handed to the client, which for a spooled message is after the outage.
    The tracker runs its join windows on event time (``carom_tracker.consumer``); on publish
    times, the first spooled report would have jumped the stream clock past every frame whose
    report was still on disk (66 false misses in a 70 s outage).
    """

    def __init__(
        self,
        producer: pulsar.Producer,
        max_in_flight: int,
        on_result: Callable[[bool], None] | None = None,
        spool: Spool | None = None,
    ) -> None:
        self._producer = producer
        self._max = max_in_flight
        self._on_result = on_result
        self.spool = spool
        self.sent = 0  # written under _lock
        self.acked = 0  # written by the client's I/O thread only
        self.failed = 0  # idem
        self.dropped = 0  # written under _lock
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._drained = threading.Condition()
        self._room = threading.Event()
        self._closed = False
        self._feeder: threading.Thread | None = None
        if spool is not None:
            self._feeder = threading.Thread(target=self._feed, name="carom-spool", daemon=True)
            self._feeder.start()

    @property
    def producer(self) -> pulsar.Producer:
        return self._producer

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked - self.failed

    @property
    def queued(self) -> int:
        """Accepted and not yet confirmed by the broker: in the client's memory or on disk."""
        return self.in_flight + (self.spool.records if self.spool is not None else 0)

    def publish(self, payload: bytes, key: str) -> bool:
        event_ms = time.time_ns() // 1_000_000
        with self._lock:
            spool = self.spool
            if spool is not None and (spool.records or self.in_flight >= self._max):
                if spool.append(payload, key, event_ms):
                    return True
                self.dropped += 1
                return False
            if self.in_flight >= self._max:
                self.dropped += 1
                return False
            self.sent += 1
            self._producer.send_async(
                payload, self._callback, partition_key=key, event_timestamp=event_ms
            )
            return True

    def _callback(self, res: pulsar.Result, _msg_id: object) -> None:
        if res == pulsar.Result.Ok:
            self.acked += 1
        else:
            self.failed += 1
            self.last_error = str(res)
        if self._on_result is not None:
            self._on_result(res == pulsar.Result.Ok)
        if self.spool is not None and self.in_flight <= self._max // 2:
            self._room.set()
        if self.in_flight == 0:
            with self._drained:
                self._drained.notify_all()

    def _feed(self) -> None:
        """Move spooled messages into the client as confirmations make room (own thread)."""
        spool = self.spool
        assert spool is not None
        while not self._closed:
            self._room.wait(0.5)
            self._room.clear()
            with self._lock:
                while spool.records and self.in_flight < self._max:
                    record = spool.pop()
                    assert record is not None
                    payload, key, event_ms = record
                    self.sent += 1
                    self._producer.send_async(
                        payload, self._callback, partition_key=key, event_timestamp=event_ms
                    )

    def drain(self, timeout: float) -> bool:
        """Block (call it from a thread of its own) until every accepted message is settled."""
        deadline = time.monotonic() + timeout
        while self.spool is not None and self.spool.records and time.monotonic() < deadline:
            self._room.set()
            time.sleep(0.05)
        self._producer.flush()
        with self._drained:
            settled = self._drained.wait_for(
                lambda: self.in_flight == 0, max(0.0, deadline - time.monotonic())
            )
        return settled and not (self.spool is not None and self.spool.records)

    def close(self) -> None:
        """Stop the spool's feeder and remove its file (after ``drain``)."""
        self._closed = True
        self._room.set()
        if self._feeder is not None:
            self._feeder.join(2.0)
        if self.spool is not None:
            with self._lock:
                self.spool.close()


def make_publisher(producer: pulsar.Producer, settings: PulsarSettings, name: str) -> Publisher:
    """The services' publisher: ``max_pending_messages`` in memory, then a spool on disk."""
    spool = Spool(settings.spool_dir, name, settings.spool_max_mb * 1024 * 1024)
    return Publisher(producer, settings.max_pending_messages, spool=spool)


def take_queued(
    consumer: pulsar.Consumer, first: pulsar.Message, limit: int
) -> list[pulsar.Message]:
    """``first`` and what is already in the consumer's queue (up to ``limit``), without waiting.

    ``receive(0)`` takes one queued message or raises Timeout at once. Measured here: 320k msg/s
    received and acked that way, about ``batch_receive``'s 340k, while ``batch_receive`` waits
    out its timeout (1 ms) whenever fewer than a batch are queued, which live is nearly always.
    Replacing it took report published -> tracker consumed from 2.8-4.1 ms p50 to 1.9-2.9 ms
    at 60-2,000 frames/s (bench/tracker_throughput.py --hop). The tracker and the recorder read
    this way.
    """
    msgs = [first]
    try:
        while len(msgs) < limit:
            msgs.append(consumer.receive(0))
    except pulsar.Timeout:
        pass
    return msgs


class TopicReader(threading.Thread):
    """Reads a topic from its newest message on a thread of its own and hands each body on.

    The client's ``read_next`` blocks, so it never runs on an event loop. A reader is
    non-durable: every instance sees every message from when it started, and no instance takes
    messages from another (the router's errors topic, the probe's truth topic). A broker outage
    does not end it: the client reconnects by itself and reading goes on where it stood.
    ``on_message`` runs on this thread: it must be quick and thread-safe (queue and return).
    """

    def __init__(
        self,
        client: pulsar.Client,
        topic: str,
        on_message: Callable[[bytes], None],
        name: str | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"carom-reader-{topic.rsplit('/', 1)[-1]}")
        self.reader = client.create_reader(topic, pulsar.MessageId.latest, reader_name=name)
        self.on_message = on_message
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                msg = self.reader.read_next(200)
            except pulsar.Timeout:
                continue
            except pulsar.PulsarException:
                # Closed under us (stopping), or the broker is away: wait, do not spin.
                self.halt.wait(0.5)
                continue
            self.on_message(msg.data())

    def stop(self, timeout_s: float = 5.0) -> None:
        self.halt.set()
        self.join(timeout_s)


#: How often a link that stays down has its disconnected handles named in the log.
STILL_DOWN_EVERY_S: Final = 30.0


class LinkWatch(threading.Thread):
    """Watches a service's Pulsar handles and says, once each, when the broker is lost and back.

    The client library reconnects by itself and logs every retry at ERROR; a user reading Carom's
    own log needs one line when the link goes down (and what was queued) and one when it is back
    (the outage's length and what it had queued). ``on_change(up, outage_s)`` is called from this
    thread on each change, e.g. to tell clients (use ``loop.call_soon_threadsafe``).
    """

    def __init__(
        self,
        service: str,
        handles: Callable[[], list[pulsar.Producer | pulsar.Consumer | pulsar.Reader]],
        queued: Callable[[], int] = lambda: 0,
        on_change: Callable[[bool, float], None] | None = None,
        interval_s: float = 0.25,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"carom-link-{service}")
        self.service = service
        self._handles = handles
        self._queued = queued
        self._on_change = on_change
        self._interval = interval_s
        self._log = logger or logging.getLogger(f"carom.{service}")
        self._halt = threading.Event()
        self.up = True
        self.down_since: float | None = None
        "``time.monotonic()`` when the link was lost; None while it is up."
        self.outages = 0
        self.last_outage_s = 0.0
        self._named_at = 0.0  # when the handles still down were last named

    def connected(self) -> bool:
        try:
            handles = self._handles()
            return bool(handles) and all(h.is_connected() for h in handles)
        except pulsar.PulsarException:
            return False

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            self.check()

    def disconnected(self) -> list[str]:
        """The handles not connected now, each as its kind and topic (for the log)."""
        try:
            return [
                f"{type(h).__name__.lower()} {h.topic()}"
                for h in self._handles()
                if not h.is_connected()
            ]
        except pulsar.PulsarException as exc:
            return [f"(cannot tell: {exc})"]

    def check(self) -> None:
        """One look (the thread calls it every ``interval_s``; tests may call it directly)."""
        up = self.connected()
        if up == self.up:
            if not up and time.monotonic() - self._named_at >= STILL_DOWN_EVERY_S:
                # A link down for long: say which handles, so an outage of the broker (all of
                # them) is told from one handle the client stopped reconnecting (the rest back).
                self._named_at = time.monotonic()
                self._log.warning(
                    "%s: Pulsar link still down after %.0f s; not connected: %s",
                    self.service,
                    self.down_for(),
                    ", ".join(self.disconnected()) or "none now",
                )
            return
        self.up = up
        now = time.monotonic()
        if not up:
            self.down_since = self._named_at = now
            self.outages += 1
            self._log.warning(
                "%s: Pulsar broker lost; %d messages queued, keeping everything until it is back",
                self.service,
                self._queued(),
            )
            outage = 0.0
        else:
            outage = now - (self.down_since or now)
            self.down_since = None
            self.last_outage_s = outage
            self._log.warning(
                "%s: Pulsar broker back after %.1f s; %d messages still queued, now being sent",
                self.service,
                outage,
                self._queued(),
            )
        if self._on_change is not None:
            self._on_change(up, outage)

    def down_for(self) -> float:
        """Seconds the link has been down (0 while it is up)."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def stop(self) -> None:
        self._halt.set()
