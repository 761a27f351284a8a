"""The tracker's engine: two receive threads, one join thread, the CSV sink and the error topic.

Receiving uses the sync Pulsar client on a thread per topic (measured: the sync consumer does
186-340k msg/s, ``pulsar.asyncio`` ~19k). Both threads decode and hand batches to one join thread
through a bounded queue, so the ``Joiner`` and the sink are only ever touched by that thread.
While draining a backlog the two receivers keep within a quarter window of each other's publish
times (``Engine._align``), so a message never waits out its window for a partner that is queued.
That policy, when a topic is caught up and where the join clock stops, is ``pacing.Pacing``:
pure, given every time as an argument; this module receives, waits and reads the clocks.

Subscriptions are durable and Key_Shared, keyed by session: replicas sharing the subscription
split the sessions. Both topics' consumers of one replica carry the same consumer name; Pulsar's
Key_Shared selector hashes keys onto consumer names, so a session's truth and reports land on the
same replica.

A message is acknowledged only once its row is fsynced (``sink.CsvSink.commit``); at shutdown the
messages still waiting for a partner are left unacked, so the broker redelivers them. A live result
is published after its row is fsynced and before its messages are acked (``_Out`` in the ack
stream), so a row that is not durable was never published. A redelivered frame whose row is
already durable is not written again (the sink's dedupe); its result is published again only if
the tracker that wrote the row died before sending it, which the errors topic tells
(``_was_published``). Each frame's live result is thus published once, across any kill.

A session's records that are not frames go to the sink beside its rows (``records``), written
from the join thread as they come and acked after the same fsync: a ``SessionEnd`` (its phases),
before the join gets it, and a ``ClientStats``, which never reaches the join (it is no frame and
no report: nothing waits for it, and it is counted as received, never as invalid).

The broker going away must not make frames ``missed``: while the link is down no topic counts as
caught up (the window clock stays on stream time), and for a while after it is back only a long
silence does, since the producers' queued messages reach the topics only once they reconnect too
(``pacing.recovery_silence``).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

import pulsar

from carom import schemas
from carom_runtime.pulsar_io import (
    LinkWatch,
    Publisher,
    TopicError,
    last_message_ids,
    raw_consumer,
    take_queued,
)
from carom_tracker import join
from carom_tracker.config import TrackerSettings, sticky_range
from carom_tracker.join import Batch, Joiner
from carom_tracker.pacing import MessageKey, Pacing, Positions
from carom_tracker.sink import CsvSink

log = logging.getLogger("carom.tracker")

_RECEIVE_BATCH: Final = 500
#: How often an idle receiver looks up (stop, caught up); a blocked ``receive`` returns as soon as
#: a message is queued, so this adds nothing to the latency.
_RECEIVE_TIMEOUT_MS: Final = 100
#: Longest single wait of a held batch (``Engine._align``): a bound, not the pace; every change
#: that can release the batch wakes it at once.
_ALIGN_WAIT_S: Final = _RECEIVE_TIMEOUT_MS / 1000
#: How often the tracker says it is alive on the errors topic (``schemas.TrackerStatus``).
STATUS_INTERVAL_S: Final = 1.0
#: How far before a redelivered row's computation the errors topic is read for its result
#: (results go out after the row's fsync, within a commit interval; generous for clock steps).
_PUBLISHED_LOOKBACK_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class _Out:
    """A live result in the ack stream: published once the rows before it are durable.

    A commit's frame results of one session go out as one ``schemas.FrameResults`` (``_ack``).
    """

    message: schemas.FrameResult | schemas.SessionResults


#: The kinds that are a session's records, written beside its CSV (``Engine._records``).
_RECORDS: Final = (schemas.SessionEnd, schemas.ClientStats)


def _stream_ms(msg: pulsar.Message) -> int:
    """A message's place in its stream: when the producer accepted it (its event time, set by
    ``carom_runtime.pulsar_io.Publisher``), else when it was published.

    They differ after an outage: a message kept in a spool is published when it leaves it, long
    after it was accepted, while the messages behind it in the same stream are still on disk.
    """
    return int(msg.event_timestamp() or msg.publish_timestamp())


def run_name(settings: TrackerSettings) -> str:
    """This run's folder name: the configured one, or the UTC start time."""
    return settings.run or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def consumer_name() -> str:
    """One name per process, shared by both topics' consumers (see the module docstring)."""
    return f"carom-tracker-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Counters:
    """Totals for /metrics; each field is written by one thread only."""

    received: list[int] = field(default_factory=lambda: [0, 0])
    invalid: list[int] = field(default_factory=lambda: [0, 0])
    orphans: int = 0
    client_stats: int = 0
    errors_not_published: int = 0
    errors_refused: int = 0
    republish_unchecked: int = 0
    unjoined_at_shutdown: int = 0
    align_wait_s: list[float] = field(default_factory=lambda: [0.0, 0.0])


Incoming = (
    schemas.Truth | schemas.NotSent | schemas.SessionEnd | schemas.Centroid | schemas.ClientStats
)
"""Any message the two topics carry."""
Item = tuple[Incoming, tuple[int, "pulsar.MessageId"], int, int]
"""A message as ``Joiner.add_many`` takes it: (message, its token (topic index, message id),
consumed at (epoch ns), its place in the stream (``_stream_ms``, in ns))."""


class Engine:
    """Consumes both topics, joins, writes CSV rows and acks them once durable."""

    def __init__(
        self,
        settings: TrackerSettings,
        client: pulsar.Client,
        run_dir: Path,
        publisher: Publisher | None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.run_dir = run_dir
        self.publisher = publisher
        self.counters = Counters()
        self.name = consumer_name()
        self.joiner = Joiner(
            window_ns=int(settings.window_s * 1e9),
            max_sessions=settings.join_max_sessions,
            max_pending=settings.join_max_pending,
        )
        self.join_counts: dict[str, int] = self.joiner.counters()
        self.sink = CsvSink(
            run_dir,
            self._ack,
            max_open=settings.max_open_files,
            dedupe_rows=settings.dedupe_rows,
            earlier_runs=run_dir.parent,
            background=True,  # fsyncs off the join thread (see the sink's docstring)
        )
        self.consumers: list[pulsar.Consumer] = []
        #: The same consumers without the Python wrapper: what receives and acks (``raw_consumer``).
        self._raw: list[pulsar.Consumer] = []
        #: Partitions of each topic as the broker has it (0: not partitioned).
        self.partitions = [0, 0]
        # (topic index, decoded messages, its oldest and newest stream times in ms: ``_stream_ms``,
        # whether a message is a session's record (``SessionEnd``, ``ClientStats``))
        self._queue: queue.Queue[tuple[int, list[Item], int, int, bool]] = queue.Queue(maxsize=64)
        self._stop = threading.Event()
        self._receivers: list[threading.Thread] = []
        self._worker: threading.Thread | None = None
        # Live results go out from the sink's committer thread, after the fsync (``_Out``):
        # off the join thread, where send_async cost more than the join (py-spy: ~45%).
        self._status: threading.Thread | None = None
        self.link = LinkWatch(
            "tracker",
            lambda: [*self.consumers, *([self.publisher.producer] if self.publisher else [])],
            queued=lambda: self.publisher.queued if self.publisher else 0,
            on_change=self._link_changed,
        )
        # Redelivered frames whose rows a dead tracker wrote: was their result published?
        self._started_ns = time.time_ns()
        self._published: set[tuple[str, int]] | None = None
        self._published_since_ns = 0
        self.failure: BaseException | None = None
        # Receive alignment, caught-up and the join clock's limit (see ``Pacing`` for which
        # thread writes what); ``_moved[t]`` is set whenever topic t's mark moves or it turns
        # idle, the only changes that can release a batch held by the other (``_align``).
        self.pacing = Pacing(settings.window_s, time.monotonic())
        self._moved = (threading.Event(), threading.Event())

    # -- lifecycle ----------------------------------------------------------------------------

    def subscribe(self) -> None:
        """Blocking: create both consumers (call it off the event loop)."""
        topics = self.settings.pulsar.topics
        policy = None
        if self.settings.key_range:  # this replica's sessions only (TrackerSettings.key_range)
            policy = pulsar.ConsumerKeySharedPolicy(
                pulsar.KeySharedMode.Sticky,
                sticky_ranges=[sticky_range(self.settings.key_range)],
            )
        for idx, topic in enumerate((topics.truth, topics.centroids)):
            names = self.client.get_topic_partitions(topic)
            # A plain topic is its one name; a partitioned one, its ``-partition-N`` names.
            plain = len(names) == 1 and "-partition-" not in names[0]
            self.partitions[idx] = 0 if plain else len(names)
            self.consumers.append(
                self.client.subscribe(
                    topic,
                    self.settings.subscription,
                    consumer_type=pulsar.ConsumerType.KeyShared,
                    initial_position=pulsar.InitialPosition.Earliest,
                    consumer_name=self.name,
                    # Prefetch for draining a backlog; no effect on live latency (measured, a
                    # bare Key_Shared consumer: p50 1.63 ms with 5000, 1.64 with the 1000 default).
                    receiver_queue_size=5000,
                    # Acks single messages of a batch (producers batch; see PulsarSettings).
                    batch_index_ack_enabled=True,
                    key_shared_policy=policy,
                )
            )
            self._raw.append(raw_consumer(self.consumers[-1]))

    def start(self) -> None:
        kinds: tuple[type[schemas.Truth], type[schemas.Centroid]] = (
            schemas.Truth,
            schemas.Centroid,
        )
        for idx, kind in enumerate(kinds):
            t = threading.Thread(
                target=self._receive, args=(idx, kind), name=f"carom-recv-{idx}", daemon=True
            )
            self._receivers.append(t)
        self._worker = threading.Thread(target=self._work, name="carom-join", daemon=True)
        self._status = threading.Thread(target=self._say_alive, name="carom-status", daemon=True)
        for t in (*self._receivers, self._worker, self._status):
            t.start()
        self.link.start()

    def stop(self, timeout: float = 20.0) -> None:
        """Blocking: stop receiving, join and commit what came, leave the unjoined unacked."""
        self._stop.set()
        for moved in self._moved:
            moved.set()  # a held batch goes on at once
        deadline = time.monotonic() + timeout
        for t in self._receivers:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._worker is not None:
            self._worker.join(max(0.0, deadline - time.monotonic()))
        self.link.stop()
        if self._status is not None:
            self._status.join(max(0.0, deadline - time.monotonic()))
        for c in self.consumers:
            try:
                c.close()
            except pulsar.PulsarException as exc:
                log.warning("closing consumer: %s", exc)

    def joining(self) -> bool:
        """The join thread runs (it stops only on a failure, which /health reports)."""
        return self.failure is None and self._worker_alive()

    def connected(self) -> bool:
        return (
            len(self.consumers) == 2
            and all(c.is_connected() for c in self.consumers)
            and self._worker is not None
            and self._worker.is_alive()
        )

    # -- threads ------------------------------------------------------------------------------

    def _receive(self, idx: int, kind: type[schemas.Truth] | type[schemas.Centroid]) -> None:
        consumer, raw = self.consumers[idx], self._raw[idx]
        counters, pacing, moved = self.counters, self.pacing, self._moved[idx]
        decode = (
            schemas.decode_truth_topic if kind is schemas.Truth else schemas.decode_centroid_topic
        )
        while not self._stop.is_set():
            try:
                first = raw.receive(_RECEIVE_TIMEOUT_MS)
                msgs = take_queued(raw, first, _RECEIVE_BATCH)
            except pulsar.Timeout:
                if not pacing.idle[idx] and self._caught_up(idx, consumer):
                    pacing.went_idle(idx)
                    moved.set()
                continue
            except pulsar.PulsarException as exc:
                if self._stop.is_set():
                    break
                log.warning("receive on %s: %s", consumer.topic(), exc)
                time.sleep(0.5)
                continue
            if not msgs:
                continue
            ends = (_stream_ms(msgs[0]), _stream_ms(msgs[-1]))
            oldest, newest = min(ends), max(ends)
            pacing.received(idx, time.monotonic(), self._positions(idx, msgs), newest)
            moved.set()
            self._align(idx, oldest)
            now = time.time_ns()
            items: list[Item] = []
            records = False
            for m in msgs:
                try:
                    decoded: Incoming = decode(m.data())
                except schemas.SchemaError as exc:
                    counters.invalid[idx] += 1
                    if counters.invalid[idx] <= 10:
                        log.warning("dropping invalid message on %s: %s", consumer.topic(), exc)
                    raw.acknowledge(m.message_id())
                    continue
                records = records or isinstance(decoded, _RECORDS)
                items.append((decoded, (idx, m.message_id()), now, _stream_ms(m) * 1_000_000))
            counters.received[idx] += len(msgs)
            while items:
                try:
                    self._queue.put((idx, items, oldest, newest, records), timeout=0.1)
                    pacing.handed(idx)
                    break
                except queue.Full:
                    # Stopping with a full queue: leave these unacked; they come back next run.
                    if self._stop.is_set() and not self._worker_alive():
                        return

    def _align(self, idx: int, oldest_ms: int) -> None:
        """Hold a batch while the other topic is busy but behind it by more than the lead.

        The join window runs on the tracker's clock. Live, both topics are read as they are
        written and this never waits. Draining a backlog (a restart after downtime, a slow
        tracker), one topic can race ahead of the other and its messages would wait out the
        window for partners still queued on the other topic: false misses and orphans. So a batch
        waits until the other topic's newest publish time is within ``lead`` of the batch's
        oldest, or that topic is caught up (``Pacing.must_hold``). Both can never wait at
        once: each would be ahead of the other by more than ``lead``.

        The wait blocks on the other topic's ``_moved`` event instead of polling. Only three
        things can release the batch: the other topic's mark moving (its receive thread sets the
        event after ``Pacing.received``), that topic turning idle (set after ``went_idle``), and
        ``stop`` (sets both); the link watch only ever makes a topic busy again. The event is
        cleared before the policy is asked, so a change between the two is never lost. This used
        to sleep 2 ms between looks: the same decisions, up to 2 ms later each. The timeout
        only bounds one wait, should a release ever come without its event.
        """
        pacing = self.pacing
        if not pacing.must_hold(idx, oldest_ms):
            return
        moved = self._moved[1 - idx]
        started = time.monotonic()
        while True:
            moved.clear()
            if self._stop.is_set() or not pacing.must_hold(idx, oldest_ms):
                break
            moved.wait(_ALIGN_WAIT_S)
        self.counters.align_wait_s[idx] += time.monotonic() - started

    def _positions(self, idx: int, msgs: list[pulsar.Message]) -> Positions:
        """The last message id of each partition a batch came from (in order within each)."""
        if not self.partitions[idx]:
            mid = msgs[-1].message_id()
            return {-1: (mid.ledger_id(), mid.entry_id())}
        out: dict[int, MessageKey] = {}
        for m in msgs:
            mid = m.message_id()
            out[mid.partition()] = (mid.ledger_id(), mid.entry_id())
        return out

    def _caught_up(self, idx: int, consumer: pulsar.Consumer) -> bool:
        """After a receive found nothing: has this consumer had everything in its topic?

        The broker is asked for the topic's last message (each partition's, through the admin
        API, for a partitioned topic: the client cannot tell those) unless only silence counts
        anyway (``Pacing.recovering``); ``Pacing.caught_up`` says why either answer is what it
        is. A broker that cannot answer (one of a cluster's brokers failing over, its admin API
        gone) leaves silence to decide, never a topic that can no longer turn idle.
        """
        if not self.link.up or not consumer.is_connected():
            return False  # an outage is not the end of a stream
        pacing = self.pacing
        now = time.monotonic()
        last: Positions | None = None
        if not pacing.recovering(now):
            try:
                if self.partitions[idx]:
                    last = last_message_ids(
                        self.settings.pulsar.admin_url, consumer.topic(), self.partitions[idx]
                    )
                else:
                    mid = consumer.get_last_message_id()
                    last = {-1: (mid.ledger_id(), mid.entry_id())}
            except (pulsar.PulsarException, TopicError, OSError, ValueError, KeyError):
                last = None
        return pacing.caught_up(idx, now, last)

    def _link_changed(self, up: bool, outage_s: float) -> None:
        """The link watch's thread: hold the clock on stream time through an outage."""
        self.pacing.link_changed(up, outage_s, time.monotonic())

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _work(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the process stays up; /health turns 503
            self.failure = exc
            log.exception("join thread failed")

    def _loop(self) -> None:
        interval = self.settings.flush_interval_ms / 1000.0
        max_pending = self.settings.max_pending_rows
        joiner, sink, pacing = self.joiner, self.sink, self.pacing
        next_flush = time.monotonic() + interval
        while True:
            try:
                wait = next_flush - time.monotonic()
                if sink.publishing:  # a live result waits for the committer: look again soon
                    wait = min(wait, 0.002)
                idx, items, oldest, newest, records = self._queue.get(timeout=max(0.0, wait))
                pacing.joining(idx, oldest)  # stream times: ``_stream_ms``
            except queue.Empty:
                items = []
                idx = newest = -1
                records = False
            joiner.hold_clock(pacing.clock_limit(time.monotonic()))
            if records:
                items = self._records(items)
            if items:
                # One join call for what came in one receive (``Joiner.add_many``).
                self._handle(joiner.add_many(cast(list[join.Incoming], items), time.time_ns()))
            if idx >= 0:
                pacing.joined(idx, newest)
            if (
                time.monotonic() >= next_flush
                or sink.pending_rows >= max_pending
                or (sink.publishing and sink.idle)  # a live result waits: out as soon as durable
            ):
                self._handle(joiner.expire(time.time_ns()))
                sink.commit()
                self.join_counts = joiner.counters()
                next_flush = time.monotonic() + interval
            if (
                self._stop.is_set()
                and not any(t.is_alive() for t in self._receivers)
                and self._queue.empty()
            ):
                break
        final = joiner.flush_all(time.time_ns())
        self._handle(final)
        sink.close()
        self.counters.unjoined_at_shutdown = len(final.unjoined)
        self.join_counts = joiner.counters()
        log.info(
            "tracker stopped: %d rows written, %d acked, %d left unjoined for the next run",
            sink.rows_written,
            sink.acked,
            len(final.unjoined),
        )

    def _records(self, items: list[Item]) -> list[Item]:
        """Write a session's records to the sink and return what the join takes.

        A ``SessionEnd`` is written and joined (its token is acked after the session's rows);
        a ``ClientStats`` is only written, its token acked by the same commit.
        """
        sink, out = self.sink, []
        for item in items:
            msg = item[0]
            if isinstance(msg, schemas.ClientStats):
                self.counters.client_stats += 1
                sink.add_record(msg, (item[1],))
                continue
            if isinstance(msg, schemas.SessionEnd):
                sink.add_record(msg)
            out.append(item)
        return out

    def _handle(self, batch: Batch) -> None:
        sink, pub = self.sink, self.publisher
        for r in batch.results:
            if r.status == "orphan":
                self.counters.orphans += 1
                sink.defer_ack(r.tokens)
                continue
            computed = sink.holds(r)
            if computed is not None:  # a redelivered frame already in the CSV: no second row
                sink.duplicates_skipped += 1
                err = r.to_error_result()
                if err is not None and pub is not None and not self._was_published(err, computed):
                    sink.defer_ack((_Out(err),), publish=True)
                sink.defer_ack(r.tokens)
                continue
            err = r.to_error_result()
            if err is not None:
                if pub is None:
                    self.counters.errors_not_published += 1
                else:  # before the row's own tokens: published before its messages are acked
                    sink.defer_ack((_Out(err),), publish=True)
            sink.add(r, r.tokens)
        if batch.acks:
            sink.defer_ack(batch.acks)
        for end in batch.ended:  # after the session's last result, on the same key: in order
            if pub is not None:
                sink.defer_ack((_Out(end.message),), publish=True)
            sink.defer_ack((end.token,))

    def _was_published(self, err: schemas.FrameResult, computed_ns: int) -> bool:
        """Whether a redelivered frame's result, whose row is durable, reached the errors topic.

        A row this process computed was (or, its publisher never dropping, will be) published by
        it. One from before it started was written by a tracker that died: its result went out
        only if that tracker was not killed between the fsync and the send. Ask the topic: the
        results published since shortly before that row, read once (restarts only).
        """
        if computed_ns >= self._started_ns:
            return True
        if self._published is None or computed_ns < self._published_since_ns:
            since = max(0, computed_ns - int(_PUBLISHED_LOOKBACK_S * 1e9))
            try:
                self._published = self._read_published(since)
            except pulsar.PulsarException as exc:
                # Unknown: never risk a second copy (at most once for this frame), look again
                # for the next one.
                self.counters.republish_unchecked += 1
                log.warning("cannot read %s to check a redelivery: %s", self._errors_topic, exc)
                return True
            self._published_since_ns = since
        return (err.session_id, err.frame) in self._published

    @property
    def _errors_topic(self) -> str:
        return self.settings.pulsar.topics.errors

    def _read_published(self, since_ns: int) -> set[tuple[str, int]]:
        seen: set[tuple[str, int]] = set()
        reader = self.client.create_reader(self._errors_topic, pulsar.MessageId.earliest)
        try:
            reader.seek(since_ns // 1_000_000)
            while reader.has_message_available():
                try:
                    msg = schemas.decode_errors_topic(reader.read_next(5_000).data())
                except schemas.SchemaError:
                    continue
                seen.update((r.session_id, r.frame) for r in schemas.results_in(msg))
        finally:
            try:
                reader.close()
            except pulsar.PulsarException:
                pass
        log.info(
            "redelivered frames already in the CSV: %d results published since %s checked",
            len(seen),
            time.strftime("%H:%M:%S", time.gmtime(since_ns / 1e9)),
        )
        return seen

    def _ack(self, tokens: Iterable[object]) -> int:
        """The sink's committer thread, once the rows before these tokens are fsynced.

        Publishes the live results first, then acks: every result before its messages' acks, as
        the module docstring requires. A session's frame results go out as ``FrameResults``
        of up to ``schemas.MAX_RESULTS_PER_MESSAGE`` (one message per commit and session
        instead of one per frame), and its ``SessionResults`` after them, on the same key.
        """
        pending: dict[str, list[schemas.FrameResult]] = {}
        acks: list[tuple[int, pulsar.MessageId]] = []
        for token in tokens:
            if not isinstance(token, _Out):
                acks.append(cast(tuple[int, pulsar.MessageId], token))
                continue
            msg = token.message
            if isinstance(msg, schemas.FrameResult):
                pending.setdefault(msg.session_id, []).append(msg)
            else:  # a session's end: after its results
                self._publish_results(msg.session_id, pending.pop(msg.session_id, []))
                self._publish(schemas.encode(msg), msg.session_id, 1)
        for sid, results in pending.items():
            self._publish_results(sid, results)
        acknowledge = [c.acknowledge for c in self._raw]
        for idx, mid in acks:
            acknowledge[idx](mid)
        return len(acks)

    def _publish_results(self, sid: str, results: list[schemas.FrameResult]) -> None:
        step = schemas.MAX_RESULTS_PER_MESSAGE
        for i in range(0, len(results), step):
            part = results[i : i + step]
            self._publish(schemas.encode(schemas.FrameResults(session_id=sid, results=part)),
                          sid, len(part))  # fmt: skip

    def _publish(self, payload: bytes, key: str, results: int) -> None:
        pub = self.publisher
        if pub is not None and not pub.publish(payload, key):
            self.counters.errors_refused += results  # the spool is full too: counted

    def _say_alive(self) -> None:
        """Publish ``TrackerStatus`` every ``STATUS_INTERVAL_S`` (routers watch for it)."""
        pub = self.publisher
        if pub is None:
            return
        interval_ms = int(STATUS_INTERVAL_S * 1000)
        while not self._stop.wait(STATUS_INTERVAL_S):
            if not self.link.up or not self._worker_alive():
                continue  # a tracker that cannot join says nothing: silence is the signal
            now_ns = time.time_ns()
            status = schemas.TrackerStatus(
                tracker=self.name,
                t_ns=now_ns,
                interval_ms=interval_ms,
                behind_ms=self.pacing.behind_ms(now_ns // 1_000_000),
            )
            pub.publish(schemas.encode(status), "tracker-status")
