"""The recorder's engine: one receive thread per route topic, each writing its own sessions.

Receiving uses the sync Pulsar client on a thread per topic (as the tracker does: the sync
consumer is an order of magnitude faster than ``pulsar.asyncio``). A topic carries one type, so
each (session, type) belongs to one thread: its ``Ledger`` and files are touched by that thread
only, and no lock is needed.

Subscriptions are durable and Key_Shared, keyed by session: replicas sharing the subscription
split the sessions. Every topic's consumer of one replica carries the same consumer name, so
Pulsar's Key_Shared selector (which hashes keys onto consumer names) puts all of a session's
types on one replica.

Per batch (what one receive got, plus what was already queued): each message is admitted by its
``Ledger`` (first copy, redelivery or duplicate), the first copies' data is written and fsynced,
then their latency rows (and the duplicates' lines) are written and fsynced, and only then is the
batch acknowledged. A crash anywhere before the acks loses nothing (the broker redelivers) and
doubles nothing (the rows say what was written). A ``ChannelEnd`` finalizes its type: the media
file is muxed, the summary written, and the end acked after them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import pulsar

from carom.channels import (
    MAX_META_BYTES,
    ChannelEnd,
    ChannelError,
    Frame,
    Record,
    Route,
    Routes,
    check_format,
    decode_record,
)
from carom_recorder.config import RecorderSettings
from carom_recorder.ledger import Ledger, Outcome, Row
from carom_recorder.store import TypeFiles
from carom_runtime.pulsar_io import LinkWatch, take_queued

log = logging.getLogger("carom.recorder")

_RECEIVE_TIMEOUT_MS: Final = 100
_RECEIVE_BATCH: Final = 200
_MAX_LOGGED: Final = 10


def consumer_name() -> str:
    """One name per process, shared by every topic's consumer (see the module docstring)."""
    return f"carom-recorder-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def message_id_text(msg: pulsar.Message) -> str:
    mid = msg.message_id()
    return f"{mid.ledger_id()}:{mid.entry_id()}:{mid.partition()}:{mid.batch_index()}"


def prefetch(route: Route, budget_bytes: int) -> int:
    """A topic's receiver queue: ``budget_bytes`` of its largest messages, 1..1000."""
    return max(1, min(1000, budget_bytes // route.max_message_bytes))


@dataclass
class Open:
    ledger: Ledger
    files: TypeFiles
    last_ns: int
    "``time.monotonic_ns()`` of its last message, for the idle finalize."


@dataclass
class TypeCounters:
    """Totals for /metrics, one per type; written by that type's thread only."""

    received: int = 0
    written: int = 0
    duplicates: int = 0
    redelivered: int = 0
    invalid: int = 0
    ends: int = 0
    finalized: int = 0
    finalized_idle: int = 0
    exactly_once: int = 0
    not_exactly_once: int = 0
    media_errors: int = 0
    write_errors: int = 0
    bytes: int = 0
    open_sessions: int = 0


class Recorder:
    """Consumes every route's topic and records each session's messages once."""

    def __init__(
        self, settings: RecorderSettings, routes: Routes, client: pulsar.Client, out_dir: Path
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.client = client
        self.out_dir = out_dir
        self.name = consumer_name()
        self.types = sorted(routes.routes)
        self.counters = {t: TypeCounters() for t in self.types}
        self.consumers: dict[str, pulsar.Consumer] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._idle_ns = int(settings.idle_finalize_s * 1e9)
        self.failure: BaseException | None = None
        self.link = LinkWatch("recorder", lambda: list(self.consumers.values()))

    def subscribe(self) -> None:
        """Blocking: one consumer per route topic (call it off the event loop)."""
        for type_ in self.types:
            route = self.routes.routes[type_]
            self.consumers[type_] = self.client.subscribe(
                route.topic,
                self.settings.subscription,
                consumer_type=pulsar.ConsumerType.KeyShared,
                initial_position=pulsar.InitialPosition.Earliest,
                consumer_name=self.name,
                receiver_queue_size=prefetch(route, self.settings.prefetch_bytes),
                batch_index_ack_enabled=True,
            )

    def start(self) -> None:
        for type_ in self.types:
            t = threading.Thread(
                target=self._run, args=(type_,), name=f"carom-rec-{type_}", daemon=True
            )
            self._threads.append(t)
            t.start()
        self.link.start()

    def stop(self, timeout: float = 20.0) -> None:
        """Blocking: stop receiving; what was written is durable, the rest stays unacked."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.link.stop()
        for c in self.consumers.values():
            try:
                c.close()
            except pulsar.PulsarException as exc:
                log.warning("closing consumer: %s", exc)

    def running(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def connected(self) -> bool:
        return len(self.consumers) == len(self.types) and self.link.connected()

    # -- one topic's thread ---------------------------------------------------------------------

    def _run(self, type_: str) -> None:
        consumer = self.consumers[type_]
        counters = self.counters[type_]
        opened: dict[str, Open] = {}
        next_idle_check = 0.0
        try:
            while not self._stop.is_set():
                try:
                    first = consumer.receive(_RECEIVE_TIMEOUT_MS)
                except pulsar.Timeout:
                    self._finalize_idle(type_, opened, counters)
                    continue
                except pulsar.PulsarException as exc:
                    if self._stop.is_set():
                        break
                    log.warning("receive on %s: %s", consumer.topic(), exc)
                    self._stop.wait(0.5)
                    continue
                msgs = take_queued(consumer, first, _RECEIVE_BATCH)
                self._batch(type_, consumer, msgs, opened, counters)
                if time.monotonic() >= next_idle_check:  # busy with other sessions
                    self._finalize_idle(type_, opened, counters)
                    next_idle_check = time.monotonic() + 1.0
        except BaseException as exc:
            self.failure = exc
            log.exception("recorder thread for %s failed", type_)
            raise
        finally:
            for o in opened.values():
                o.files.close()

    def _open(self, type_: str, session: str, opened: dict[str, Open]) -> Open:
        o = opened.get(session)
        if o is None:
            files = TypeFiles(self.out_dir, session, type_, self.routes.routes[type_].format)
            ledger = Ledger(session, type_)
            rows, dups = files.load()
            ledger.restore(rows, dups)
            o = opened[session] = Open(ledger, files, time.monotonic_ns())
        return o

    def _batch(
        self,
        type_: str,
        consumer: pulsar.Consumer,
        msgs: list[pulsar.Message],
        opened: dict[str, Open],
        counters: TypeCounters,
    ) -> None:
        now_ns = time.time_ns()
        counters.received += len(msgs)
        writes: list[tuple[Open, Row]] = []
        dups: list[tuple[Open, int, str]] = []
        ends: list[tuple[Open, ChannelEnd, pulsar.Message]] = []
        acks: list[pulsar.Message] = []
        touched: set[str] = set()
        redelivered = 0
        try:
            for m in msgs:
                try:
                    record = self._check(type_, decode_record(m.data()))
                except ChannelError as exc:
                    counters.invalid += 1
                    if counters.invalid <= _MAX_LOGGED:
                        log.warning("dropping invalid message on %s: %s", consumer.topic(), exc)
                    acks.append(m)
                    continue
                o = self._open(type_, record.session_id, opened)
                o.last_ns = time.monotonic_ns()
                touched.add(record.session_id)
                if isinstance(record, ChannelEnd):
                    ends.append((o, record, m))
                    continue
                mid = message_id_text(m)
                outcome = o.ledger.admit(record.seq, mid)
                if outcome is Outcome.WRITE:
                    o.files.write_data(record)
                    writes.append((o, Row.of(record, mid, now_ns)))
                elif outcome is Outcome.DUPLICATE:
                    dups.append((o, record.seq, mid))
                else:
                    redelivered += 1
                acks.append(m)
            for session in touched:
                opened[session].files.sync_data()
            for o, row in writes:
                o.files.write_row(row)
                o.ledger.written(row)
            for o, seq, mid in dups:
                o.files.write_duplicate(seq, mid, now_ns)
            for session in touched:
                opened[session].files.sync_rows()
        except OSError as exc:
            # The disk refused (full, gone): nothing of this batch is acked, and the touched
            # sessions are reloaded from their durable rows when the broker redelivers it.
            counters.write_errors += 1
            log.error("writing %s: %s; the batch is left for redelivery", type_, exc)
            for session in touched:
                opened.pop(session).files.close()
            for m in msgs:
                consumer.negative_acknowledge(m)
            self._stop.wait(1.0)
            return
        counters.written += len(writes)
        counters.duplicates += len(dups)
        counters.redelivered += redelivered
        counters.bytes += sum(row.bytes for _, row in writes)
        for m in acks:
            consumer.acknowledge(m)
        for o, end, m in ends:
            counters.ends += 1
            o.ledger.end = end
            opened.pop(end.session_id, None)
            if self._finalize(o, counters):
                consumer.acknowledge(m)
            else:
                consumer.negative_acknowledge(m)
        counters.open_sessions = len(opened)

    def _check(self, type_: str, record: Record) -> Record:
        """The record, if this recorder can write it: its topic's type and format, a session id
        that is a folder name, a payload its format's rules accept (``check_format``, the
        router's own check), a meta that fits a chunk store's frame. Else ``ChannelError``."""
        if record.type != type_:
            raise ChannelError("bad_record", f"a {record.type} record on {type_}'s topic")
        if record.session_id in (".", ".."):
            raise ChannelError("bad_record", f"session id {record.session_id!r}")
        if isinstance(record, ChannelEnd):
            return record
        fmt = self.routes.routes[type_].format
        if record.format != fmt:
            raise ChannelError("bad_record", f"a {record.format} record on a {fmt} route")
        if len(msgspec.json.encode(record.meta)) > MAX_META_BYTES:
            raise ChannelError("bad_record", f"{type_} #{record.seq}: meta too large")
        frame = Frame(type_, record.seq, record.t_capture_ms, record.meta, record.payload)
        check_format(fmt, frame)
        return record

    def _finalize(self, o: Open, counters: TypeCounters, idle: bool = False) -> bool:
        """Media file and summary for one session's type (again, if it was finalized before);
        False when the disk refused them (the end is then redelivered)."""
        try:
            info = o.files.write_media()
            summary = o.ledger.summary(info)
            o.files.write_summary(summary)
        except OSError as exc:
            counters.write_errors += 1
            log.error("finalizing %s %s: %s", o.ledger.session_id, o.ledger.type, exc)
            return False
        finally:
            o.files.close()
        counters.finalized += 1
        counters.finalized_idle += idle
        if info is not None and info.get("error"):
            counters.media_errors += 1
        if not idle:
            if summary["exactly_once"]:
                counters.exactly_once += 1
            else:
                counters.not_exactly_once += 1
                log.warning(
                    "%s %s not exactly once: %d missing, %d against the router's end",
                    o.ledger.session_id,
                    o.ledger.type,
                    summary["missing"],
                    len(summary["unexpected_seqs"]),
                )
        return True

    def _finalize_idle(self, type_: str, opened: dict[str, Open], counters: TypeCounters) -> None:
        now = time.monotonic_ns()
        for session, o in list(opened.items()):
            if now - o.last_ns >= self._idle_ns:
                log.info("%s %s: no ChannelEnd after %.0f s idle, finalized as is",
                         session, type_, self._idle_ns / 1e9)  # fmt: skip
                self._finalize(o, counters, idle=True)
                del opened[session]
        counters.open_sessions = len(opened)
