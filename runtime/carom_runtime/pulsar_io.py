"""Thin Pulsar glue shared by the services: one way to make clients, producers and to publish.

Hot paths publish with the sync client's ``send_async`` + callback (measured here: ~33k msg/s from
an asyncio loop, vs ~15k for ``pulsar.asyncio``); the callback runs on the client's I/O thread
and only touches counters, so the event loop never blocks on Pulsar.
"""

from __future__ import annotations

import contextlib
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
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import pulsar

from carom_runtime.config import PulsarSettings

_T = TypeVar("_T")
log = logging.getLogger("carom.pulsar")

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


#: ``PulsarSettings.client_log`` as the ``logging`` level ``quiet_logger`` takes.
CLIENT_LOG_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL,
}


def make_client(settings: PulsarSettings, logger: object | None = None) -> pulsar.Client:
    """The one client configuration; ``logger`` overrides ``settings.client_log`` (the CLIs')."""
    return pulsar.Client(
        settings.url,
        operation_timeout_seconds=settings.operation_timeout_s,
        connection_timeout_ms=min(10_000, settings.operation_timeout_s * 1000),
        logger=logger or quiet_logger(CLIENT_LOG_LEVELS[settings.client_log]),
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


def connect_at_start(settings: PulsarSettings, connect: Callable[[], _T], what: str) -> _T:
    """``connect()`` until it works or ``settings.start_timeout_s`` is spent (blocking: at start,
    off the event loop). A failed attempt must leave nothing behind (``connect`` cleans up).

    A broker still starting answers with timeouts and refusals for a while; a service that gave
    up at the first one had to be restarted by hand (or by its orchestrator).
    """
    deadline = time.monotonic() + settings.start_timeout_s
    while True:
        try:
            return connect()
        except (pulsar.PulsarException, AdminUnreachable) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: Pulsar at %s not ready (%s); trying again", what, settings.url, exc)
            time.sleep(1.0)


class TopicError(RuntimeError):
    """A topic is not as the configuration says (e.g. its partition count); the service stops."""


class AdminUnreachable(TopicError):
    """The admin API did not answer (a broker still starting: ``connect_at_start`` tries again)."""


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
            raise AdminUnreachable(
                f"cannot reach the admin API at {settings.admin_url}: {exc}"
            ) from None
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


#: A producer not connected for this long is closed and made again (``Publisher``).
RENEW_AFTER_S: Final = 30.0
#: Between attempts to make the replacement producer while the broker refuses it.
RENEW_RETRY_S: Final = 2.0


class Stuck:
    """When a producer has been disconnected long enough to be replaced (pure; no I/O).

    ``observe`` is fed a look at the producer (connected or not, and when) and answers True once
    it has stayed disconnected for ``after_s`` without a break; the clock then starts again, so
    a replacement that does not connect either is tried again ``after_s`` later, not at once.
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.down_since: float | None = None

    def observe(self, connected: bool, now: float) -> bool:
        if connected:
            self.down_since = None
            return False
        if self.down_since is None:
            self.down_since = now
            return False
        if now - self.down_since < self.after_s:
            return False
        self.down_since = now
        return True


class Publisher:
    """Publishing that never blocks the caller and never drops or doubles what it accepted.

    Up to ``max_in_flight`` messages wait in the Pulsar client for the broker's confirmation;
    the producer never times them out (``send_timeout_millis=0``), so a broker outage only delays
    them: the client resends them, in order, once it reconnects. What a killed broker had stored
    without its confirmation reaching us is then sent twice: the broker's deduplication
    (``brokerDeduplicationEnabled``, in every broker config Carom ships) stores it once, by the
    producer's name and the message's sequence id (tests/faults/test_broker_crash_publish.py).

    Past that bound, with a ``spool``, messages go to disk and follow in order as confirmations
    come in (everything published after the first spooled message is spooled too, so one key's
    messages never overtake each other). Only when the spool is full too (or without one) is a
    message refused: ``publish`` returns False and counts it in ``dropped``. Errors the client
    gives up on land in ``failed``.

    **A producer the client stopped reconnecting is replaced.** Seen on a cluster losing a bookie
    (pulsar-client 3.13): a broker that cannot write a partition's ledger closes its producers; a
    partition producer whose close notice was handled before the answer to its creation then
    believes it is connected, ignores its scheduled reconnection, and never sends again (its
    messages wait for ever; the client's log: "Broker notification of Closed producer", then
    "Created producer", then "Ignoring reconnection request since we're already connected").
    With ``renew`` (a function making the same producer again, under the same name), a producer
    not connected for ``renew_after_s`` is closed and made again, and every message not yet
    confirmed is sent again on it, in order, under the sequence id it first had: Publisher sets
    every message's id itself, so the broker's deduplication drops those it had already stored
    (tests/runtime/test_pulsar_io.py replaces a producer mid-stream: each message stored once).

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
        renew: Callable[[], pulsar.Producer] | None = None,
        renew_after_s: float = RENEW_AFTER_S,
    ) -> None:
        self._producer = producer
        self._max = max_in_flight
        self._on_result = on_result
        self.spool = spool
        self._renew = renew
        self._stuck = Stuck(renew_after_s)
        self.sent = 0  # written under _lock
        self.acked = 0  # written by the client's I/O thread only
        self.failed = 0  # idem
        self.dropped = 0  # written under _lock
        self.resent = 0  # written by the publisher's thread only
        self.replacements = 0  # idem
        self.last_error: str | None = None
        # Handed to the client and not yet settled, by sequence id, in the order sent: what a
        # replacement producer sends again. Settled (popped) on the client's I/O thread.
        self._pending: dict[int, tuple[bytes, str, int]] = {}
        # Above every id the broker has from this producer's name (a name kept across restarts,
        # like the simulator's, has a history there): lower ids would be taken for duplicates.
        # Never 0: the client library sends a sequence id of 0 as "none" and numbers that
        # message itself, which a replacement producer numbers anew (seen: stored twice).
        self._next_seq = max(1, producer.last_sequence_id() + 1)
        self._generation = 0  # callbacks of a replaced producer's are ignored
        self._renewing = False
        self._lock = threading.Lock()
        self._drained = threading.Condition()
        self._room = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        if spool is not None or renew is not None:
            self._thread = threading.Thread(target=self._run, name="carom-publisher", daemon=True)
            self._thread.start()

    @property
    def producer(self) -> pulsar.Producer:
        """The producer in use now (another one after a replacement)."""
        return self._producer

    @property
    def in_flight(self) -> int:
        return len(self._pending)

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
            self._send(payload, key, event_ms)
            return True

    def _send(self, payload: bytes, key: str, event_ms: int) -> None:
        """Give one new message a sequence id and the client (under ``_lock``)."""
        seq = self._next_seq
        self._next_seq += 1
        self._pending[seq] = (payload, key, event_ms)
        self.sent += 1
        if not self._renewing:  # else the replacement producer sends it
            self._producer.send_async(
                payload,
                partial(self._callback, self._generation, seq),
                partition_key=key,
                event_timestamp=event_ms,
                sequence_id=seq,
            )

    def _callback(self, generation: int, seq: int, res: pulsar.Result, _msg_id: object) -> None:
        if generation != self._generation:
            return  # a replaced producer's: the message is sent again on the new one
        if self._pending.pop(seq, None) is None:
            return
        if res == pulsar.Result.Ok:
            self.acked += 1
        else:
            self.failed += 1
            self.last_error = str(res)
        if self._on_result is not None:
            self._on_result(res == pulsar.Result.Ok)
        # Wake the publisher's thread only when it has something to feed: woken on every
        # confirmation, it took the GIL and the lock publish() needs once per message (measured:
        # bench/results/router-profile.md). A record spooled just after this check is fed by the
        # next confirmation, or by the thread's own 0.5 s wake-up.
        spool = self.spool
        if spool is not None and spool.records and self.in_flight <= self._max // 2:
            self._room.set()
        if not self._pending:
            with self._drained:
                self._drained.notify_all()

    def _run(self) -> None:
        """The publisher's own thread: feeds the spool, and replaces a stuck producer."""
        while not self._halt.is_set():
            self._room.wait(0.5)
            self._room.clear()
            if self._halt.is_set():
                return
            if self.spool is not None:
                self._feed(self.spool)
            if self._renew is not None and self._stuck.observe(self._connected(), time.monotonic()):
                self.replace()

    def _feed(self, spool: Spool) -> None:
        """Move spooled messages into the client as confirmations make room."""
        with self._lock:
            while spool.records and self.in_flight < self._max:
                record = spool.pop()
                assert record is not None
                self._send(*record)

    def _connected(self) -> bool:
        try:
            return bool(self._producer.is_connected())
        except pulsar.PulsarException:
            return False

    def replace(self) -> bool:
        """Close the producer, make it again (``renew``) and send again what is unconfirmed.

        Blocks (the publisher's thread calls it; tests may too) until the new producer exists or
        the publisher is closed; False then. New messages wait in memory (then the spool)
        meanwhile, after the unconfirmed ones.
        """
        assert self._renew is not None
        with self._lock:
            self._renewing = True
            self._generation += 1
            old = self._producer
        log.warning(
            "producer %s on %s not connected for %.0f s: replacing it (%d messages to send again)",
            _name(old),
            _topic(old),
            self._stuck.after_s,
            self.in_flight,
        )
        _close_within(old, RENEW_RETRY_S * 5)
        while True:
            try:
                new = self._renew()
                break
            except pulsar.PulsarException as exc:
                log.warning("producer %s: not made again yet (%s); retrying", _name(old), exc)
                if self._halt.wait(RENEW_RETRY_S):
                    return False
        with self._lock:
            self._producer = new
            self._renewing = False
            generation = self._generation
            again = list(self._pending.items())
            for seq, (payload, key, event_ms) in again:
                new.send_async(
                    payload,
                    partial(self._callback, generation, seq),
                    partition_key=key,
                    event_timestamp=event_ms,
                    sequence_id=seq,
                )
            self.resent += len(again)
            self.replacements += 1
        log.warning("producer %s replaced; %d messages sent again", _name(new), len(again))
        return True

    def drain(self, timeout: float) -> bool:
        """Block (call it from a thread of its own) until every accepted message is settled."""
        deadline = time.monotonic() + timeout
        while self.spool is not None and self.spool.records and time.monotonic() < deadline:
            self._room.set()
            time.sleep(0.05)
        with contextlib.suppress(pulsar.PulsarException):  # replaced under us: the wait says
            self._producer.flush()
        with self._drained:
            settled = self._drained.wait_for(
                lambda: not self._pending, max(0.0, deadline - time.monotonic())
            )
        return settled and not (self.spool is not None and self.spool.records)

    def close(self) -> None:
        """Stop the publisher's thread and remove the spool's file (after ``drain``)."""
        self._halt.set()
        self._room.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self.spool is not None:
            with self._lock:
                self.spool.close()


def _name(producer: pulsar.Producer) -> str:
    try:
        return str(producer.producer_name())
    except pulsar.PulsarException:
        return "?"


def _topic(producer: pulsar.Producer) -> str:
    try:
        return str(producer.topic())
    except pulsar.PulsarException:
        return "?"


def _close_within(producer: pulsar.Producer, timeout_s: float) -> None:
    """Close ``producer`` on a thread of its own, waiting at most ``timeout_s`` for it: a
    partition producer that lost its connection must not hold up its replacement."""

    def close() -> None:
        with contextlib.suppress(pulsar.PulsarException):
            producer.close()

    closer = threading.Thread(target=close, name="carom-producer-close", daemon=True)
    closer.start()
    closer.join(timeout_s)


def make_publisher(
    client: pulsar.Client,
    topic: str,
    settings: PulsarSettings,
    name: str,
    producer_name: str | None = None,
) -> Publisher:
    """The services' publisher on ``topic`` (blocking: it connects; call it off the loop).

    ``max_pending_messages`` in memory, then a spool on disk; a producer the client stopped
    reconnecting is replaced under its name, ``producer_name`` or one made unique here (the
    broker's deduplication tells messages apart by producer name and sequence id).
    """
    unique = f"carom-{name.removeprefix('carom-')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pname = producer_name or unique

    def make() -> pulsar.Producer:
        return make_producer(client, topic, settings, pname)

    producer = make()  # first: a failed attempt leaves no spool file behind
    spool = Spool(settings.spool_dir, name, settings.spool_max_mb * 1024 * 1024)
    return Publisher(producer, settings.max_pending_messages, spool=spool, renew=make)


def raw_consumer(consumer: pulsar.Consumer) -> pulsar.Consumer:
    """The client's own (pybind11) consumer inside a ``pulsar.Consumer``, for a hot loop.

    Its ``receive`` gives the C++ client's message itself, with the ``data``, ``message_id``,
    ``event_timestamp`` and ``publish_timestamp`` that ``pulsar.Message`` only wraps, and its
    ``acknowledge`` takes a message id as it is. The wrapper costs a Python object and a type
    check per message and per ack: a bare loop that receives and acks a backlog did 19.6k msg/s
    through it and 22.1k without (pulsar-client 3.13, one run here). The tracker reads and acks
    this way; ``tests/runtime`` holds the attribute to the pinned client.
    """
    return consumer._consumer


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
