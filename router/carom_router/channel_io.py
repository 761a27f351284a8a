"""The typed channels' shell: the routes file, one producer per route topic, the CSV, metrics.

``carom_router.channels`` decides for each session; this module carries it out:

- **Routes**: loaded at start (a bad file stops the router: there are no old routes to keep),
  then reloaded when the file changes (looked at every ``reload_poll_s``) and on SIGHUP. A bad
  file is refused with the reason (one ERROR line, ``carom_router_routes_reloads_total
  {outcome="refused"}``, ``GET /routes``) and the routes in force stay. Open sessions keep going
  across a reload and are judged by the new routes from their next message on.
- **Pulsar**: one producer per route topic, created off the event loop at start and on reload,
  batching off, chunking on where a route's ``max_message_bytes`` is over the broker's 5 MB.
  Messages go out with ``send_async``; the callback (on the client's I/O thread) hops to the
  loop, which keeps all the state. Per route, at most ``max_queue`` messages wait for the
  broker's confirmation (or for the producer); beyond that ``on_overflow`` applies: ``refuse``
  (the client is told ``overflow``), ``spool`` (to disk, sent in order as room comes; refused
  when the spool is full), ``close`` (the session is closed). A failed publish is resent
  ``retries`` times, then recorded in the session's ``ChannelEnd.failed_seqs``.
- **Figures**: per type Prometheus counters and gauges, and a CSV row per type per
  ``csv_interval_s``: messages/s, bytes/s, queue depth, publish latency (``send_async`` to its
  callback) p50/p99, refused, failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec
import pulsar
import yaml

from carom import channels as ch
from carom_router import channels as core
from carom_router.config import RouterSettings
from carom_runtime.pulsar_io import Spool

log = logging.getLogger("carom.router")

#: The broker's largest message (Pulsar's default ``maxMessageSize``): routes allowing more are
#: published chunked.
BROKER_MAX_MESSAGE_BYTES: Final = 5 * 1024 * 1024
#: Producer creation that failed (the broker away) is tried again this often.
PRODUCER_RETRY_S: Final = 2.0
CSV_COLUMNS: Final = (
    "time",
    "type",
    "messages_per_s",
    "bytes_per_s",
    "queue_depth",
    "publish_p50_ms",
    "publish_p99_ms",
    "refused",
    "failed",
)


class Owner(Protocol):
    """The session a message came from (a ``Link``): refusals and ends go back to it."""

    def channel_act(self, actions: list[core.ChannelAction]) -> None: ...
    def channel_close(self, code: str, message: str) -> None: ...


def load_routes(path: Path) -> ch.Routes:
    """The routes file at ``path``; ``ChannelError("bad_routes")`` says what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ch.ChannelError("bad_routes", f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ch.ChannelError("bad_routes", f"{path}: not YAML: {exc}") from None
    return ch.parse_routes(tree, str(path))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class _Entry:
    """One record on its way to a topic."""

    record: ch.ChannelMessage | ch.ChannelEnd
    label: str
    session: core.SessionChannels
    owner: Owner | None
    attempt: int = 0
    t_send_ns: int = 0
    producer: pulsar.Producer | None = None


@dataclass
class TypeStats:
    """One type's figures: totals for Prometheus, the interval's for the CSV."""

    counters: Counter[str] = field(default_factory=Counter)
    interval: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    last_p50_ms: float = math.nan
    last_p99_ms: float = math.nan

    def add(self, what: str, n: int = 1) -> None:
        self.counters[what] += n
        self.interval[what] += n


class TopicOut:
    """One route topic's producer, its messages in flight, and its spool."""

    def __init__(self, hub: ChannelHub, topic: str, route: ch.Route, label: str) -> None:
        self.hub = hub
        self.topic = topic
        self.route = route
        self.label = label
        self.producer: pulsar.Producer | None = None
        self.config: tuple[bool, int] | None = None
        self._creating: tuple[bool, int] | None = None
        self.in_flight: dict[int, _Entry] = {}
        #: Waiting for the producer (created off the loop) or for room: in memory, in order.
        self.waiting: deque[_Entry] = deque()
        self.spool: Spool | None = None
        #: The spooled records' entries without their bytes (those are on disk), in order.
        self.spooled: deque[_Entry] = deque()
        self._old: dict[int, pulsar.Producer] = {}

    @property
    def queued(self) -> int:
        return len(self.in_flight) + len(self.waiting) + len(self.spooled)

    def wanted(self) -> tuple[bool, int]:
        chunking = self.route.max_message_bytes > BROKER_MAX_MESSAGE_BYTES
        return (chunking, round(self.route.timeout_s * 1000))

    # producers --------------------------------------------------------------------------------

    def ensure_producer(self) -> None:
        want = self.wanted()
        if self.config == want or self._creating == want:
            return
        self._creating = want
        self.hub.spawn(self._create(want))

    async def _create(self, want: tuple[bool, int]) -> None:
        chunking, timeout_ms = want
        client = self.hub.client
        assert client is not None
        loop = asyncio.get_running_loop()
        while self._creating == want:
            try:
                producer = await loop.run_in_executor(
                    None,
                    lambda: client.create_producer(
                        self.topic,
                        batching_enabled=False,  # chunking requires it, and each is sent at once
                        chunking_enabled=chunking,
                        max_pending_messages=max(1000, 2 * self.route.max_queue),
                        block_if_queue_full=False,
                        send_timeout_millis=timeout_ms,
                    ),
                )
            except pulsar.PulsarException as exc:
                self.hub.counters["producer_errors"] += 1
                log.warning("channels: no producer for %s yet (%s); retrying", self.topic, exc)
                await asyncio.sleep(PRODUCER_RETRY_S)
                continue
            if self._creating != want:  # a reload wants another one meanwhile
                self.hub.close_producer(producer)
                return
            old, self.producer, self.config, self._creating = self.producer, producer, want, None
            if old is not None:
                self._retire(old)
            self.pump()
            return

    def _retire(self, producer: pulsar.Producer) -> None:
        if any(e.producer is producer for e in self.in_flight.values()):
            self._old[id(producer)] = producer
        else:
            self.hub.close_producer(producer)

    # publishing -------------------------------------------------------------------------------

    def offer(self, entry: _Entry) -> str | None:
        """Take ``entry`` (None), or say why not (its route's ``on_overflow`` applies).

        An end is never refused: it follows its session's messages (to the spool if they are
        there), whatever the bound.
        """
        spooling = self.route.on_overflow == "spool"
        if isinstance(entry.record, ch.ChannelEnd):
            if not (self.spooled and self._spool(entry)):
                self.waiting.append(entry)
            self.pump()
            return None
        full = len(self.in_flight) + len(self.waiting) >= self.route.max_queue
        if full and not spooling:
            return f"{self.queued} {self.label} messages wait for the broker (max_queue)"
        if spooling and (full or self.spooled):
            return None if self._spool(entry) else "the spool is full"
        self.waiting.append(entry)
        self.pump()
        return None

    def _spool(self, entry: _Entry) -> bool:
        if self.spool is None:
            s = self.hub.settings.pulsar
            self.spool = Spool(s.spool_dir, f"ch-{self.label}", s.spool_max_mb * 1024 * 1024)
        data = ch.encode_record(entry.record)
        key = entry.record.session_id
        if not self.spool.append(data, key):
            return False
        self.spooled.append(dataclasses.replace(entry, record=_placeholder(entry.record)))
        return True

    def pump(self) -> None:
        """Send what waits while there is room: memory first, then the spool, in order."""
        if self.producer is None:
            return
        limit = self.route.max_queue
        while self.waiting and (len(self.in_flight) < limit or _is_end(self.waiting[0])):
            self._send(self.waiting.popleft())
        while self.spooled and not self.waiting and len(self.in_flight) < limit:
            assert self.spool is not None
            popped = self.spool.pop()
            entry = self.spooled.popleft()
            if popped is None:  # cannot be: one entry per record
                continue
            entry.record = ch.decode_record(popped[0])
            self._send(entry)

    def _send(self, entry: _Entry) -> None:
        producer = self.producer
        assert producer is not None
        now = time.time_ns()
        entry.t_send_ns, entry.producer = now, producer
        record = entry.record
        if isinstance(record, ch.ChannelMessage):
            record = msgspec.structs.replace(record, t_published_ns=now, attempt=entry.attempt)
            entry.record = record
        token = next(self.hub.tokens)
        self.in_flight[token] = entry
        loop = self.hub.loop

        def done(res: pulsar.Result, _msg_id: object) -> None:  # the client's I/O thread
            with contextlib.suppress(RuntimeError):  # the loop closed while stopping
                loop.call_soon_threadsafe(self._done, token, res)

        try:
            producer.send_async(
                ch.encode_record(record), done, partition_key=record.session_id,
                event_timestamp=now // 1_000_000,
            )  # fmt: skip
        except pulsar.PulsarException as exc:  # the client's own queue full, or closed
            self.in_flight.pop(token, None)
            self._failed(entry, str(exc))

    def _done(self, token: int, res: pulsar.Result) -> None:
        entry = self.in_flight.pop(token, None)
        if entry is None:
            return
        old = entry.producer
        idle = not any(e.producer is old for e in self.in_flight.values())
        if old is not None and id(old) in self._old and idle:
            self.hub.close_producer(self._old.pop(id(old)))
        if res == pulsar.Result.Ok:
            self.hub.settled(self, entry, ok=True)
        else:
            self._failed(entry, str(res))
        self.pump()

    def _failed(self, entry: _Entry, why: str) -> None:
        if entry.attempt < self.route.retries:
            entry.attempt += 1
            self.hub.stats(entry.label).add("retried")
            self.waiting.appendleft(entry)
            self.hub.loop.call_later(0.05, self.pump)
            return
        self.hub.counters["publish_failed"] += 1
        if isinstance(entry.record, ch.ChannelEnd):
            log.error("channels: the end of %s %s was not published: %s",
                      entry.record.session_id, entry.label, why)  # fmt: skip
            return
        self.hub.settled(self, entry, ok=False)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


def _is_end(entry: _Entry) -> bool:
    return isinstance(entry.record, ch.ChannelEnd)


def _placeholder(record: ch.ChannelMessage | ch.ChannelEnd) -> ch.ChannelMessage | ch.ChannelEnd:
    """A spooled record's entry keeps who and which seq, not its bytes (those are on disk)."""
    if isinstance(record, ch.ChannelMessage):
        return msgspec.structs.replace(record, payload=b"", meta={})
    return record


class ChannelHub:
    """The router's typed channels: routes in force, producers, sessions' channels, figures."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.path = settings.channels.routes_path()
        #: Raises ``ChannelError`` on a bad file: at start there are no old routes to keep.
        self.routes = load_routes(self.path)
        self.loaded_at = time.time()
        self._stamp = _stamp(self.path)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.reloads: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.client: pulsar.Client | None = None
        self.outs: dict[str, TopicOut] = {}
        self.sessions: set[core.SessionChannels] = set()
        self.by_type: dict[str, TypeStats] = {}
        self.tokens = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._csv: Path | None = (
            Path(settings.channels.metrics_csv) if settings.channels.metrics_csv else None
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def stats(self, label: str) -> TypeStats:
        st = self.by_type.get(label)
        if st is None:
            st = self.by_type[label] = TypeStats()
        return st

    # lifecycle --------------------------------------------------------------------------------

    async def start(self, client: pulsar.Client) -> None:
        self.client = client
        self._loop = asyncio.get_running_loop()
        self._apply(self.routes)
        self.spawn(self._watch())
        if self._csv is not None:
            self.spawn(self._write_csv(self._csv))
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            self._loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        names = ", ".join(f"{n} -> {r.topic}" for n, r in self.routes.routes.items())
        log.info("channels: routes from %s: %s", self.path, names or "none")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Publish what sessions left (their ends), then close the producers."""
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            self.loop.remove_signal_handler(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while any(o.queued for o in self.outs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        loop = asyncio.get_running_loop()
        for out in self.outs.values():
            out._creating = None
            if out.producer is not None:
                producer = out.producer
                with contextlib.suppress(pulsar.PulsarException):
                    await loop.run_in_executor(None, producer.close)
            out.close()

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counters["internal_errors"] += 1
            log.error("channels: a task failed", exc_info=task.exception())

    def close_producer(self, producer: pulsar.Producer) -> None:
        def close() -> None:
            with contextlib.suppress(pulsar.PulsarException):
                producer.close()

        self.loop.run_in_executor(None, close)

    # routes -----------------------------------------------------------------------------------

    def _apply(self, routes: ch.Routes) -> None:
        self.routes = routes
        for name, route in routes.routes.items():
            out = self.outs.get(route.topic)
            if out is None:
                out = self.outs[route.topic] = TopicOut(self, route.topic, route, name)
            out.route, out.label = route, name
            self.stats(name)
            out.ensure_producer()
        for session in self.sessions:
            session.set_routes(routes)

    def request_reload(self) -> None:
        """SIGHUP: read the file now, changed or not."""
        self.spawn(self.reload("signal"))

    async def reload(self, why: str = "changed") -> bool:
        """Read the routes file again; apply it if good, else keep the routes in force."""
        loop = asyncio.get_running_loop()
        self._stamp = await loop.run_in_executor(None, _stamp, self.path)
        try:
            routes = await loop.run_in_executor(None, load_routes, self.path)
        except ch.ChannelError as exc:
            self.reloads["refused"] += 1
            self.last_error, self.last_error_at = str(exc), time.time()
            log.error("channels: routes file refused (%s), the old routes kept: %s", why, exc)
            return False
        self.reloads["ok"] += 1
        self.last_error = self.last_error_at = None
        if routes != self.routes:
            self._apply(routes)
            self.loaded_at = time.time()
            log.info("channels: routes reloaded (%s): %s", why, ", ".join(routes.routes))
        return True

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.channels.reload_poll_s)
            stamp = await loop.run_in_executor(None, _stamp, self.path)
            if stamp != self._stamp:
                await self.reload()

    def describe(self) -> dict[str, object]:
        """``GET /routes``: what is in force, from where, and the last refusal."""
        return {
            "file": str(self.path),
            "loaded_at": self.loaded_at,
            "routes": msgspec.to_builtins(self.routes.routes),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "reloads": dict(self.reloads),
        }

    # sessions ---------------------------------------------------------------------------------

    def open_session(self, session_id: str) -> core.SessionChannels:
        session = core.SessionChannels(self.routes, session_id)
        self.sessions.add(session)
        return session

    def count(self, actions: list[core.ChannelAction]) -> None:
        for a in actions:
            if isinstance(a, core.Refuse):
                self.stats(a.label).add(f"refused_{a.code}")
                self.stats(a.label).add("refused")
            elif isinstance(a, core.BadStream):
                self.counters[f"bad_{a.code}"] += 1
            elif isinstance(a, core.BadDatagram):
                self.counters[f"bad_datagram_{a.code}"] += 1

    def publish(
        self, session: core.SessionChannels, owner: Owner | None, action: core.PublishChannel
    ) -> list[core.ChannelAction]:
        """Hand an accepted message on to its topic; what comes of it if its route is full."""
        route, msg = action.route, action.message
        out = self.outs.get(route.topic)
        if out is None:  # the routes changed since the core judged it: its old topic
            out = self.outs[route.topic] = TopicOut(self, route.topic, route, msg.type)
            out.ensure_producer()
        stats = self.stats(msg.type)
        why = out.offer(_Entry(msg, msg.type, session, owner))
        if why is None:
            stats.add("accepted")
            stats.add("bytes", len(msg.payload))
            return []
        if out.route.on_overflow == "close" and owner is not None:
            owner.channel_close("overflow", f"{msg.type}: {why}; closing the session")
        why = f"{msg.type} #{msg.seq}: {why}"
        return session.overflow(msg.type, msg.seq, why, time.time_ns())

    def publish_end(self, session: core.SessionChannels, action: core.PublishEnd) -> None:
        route = action.route
        out = self.outs.get(route.topic)
        if out is None:
            out = self.outs[route.topic] = TopicOut(self, route.topic, route, action.end.type)
            out.ensure_producer()
        out.offer(_Entry(action.end, action.end.type, session, None))
        self.counters["ends"] += 1

    def settled(self, out: TopicOut, entry: _Entry, ok: bool) -> None:
        record = entry.record
        if isinstance(record, ch.ChannelEnd):
            self._forget_if_done(entry.session)
            return
        stats = self.stats(entry.label)
        stats.add("published" if ok else "failed")
        if ok:
            stats.latencies_ms.append((time.time_ns() - entry.t_send_ns) / 1e6)
            if len(stats.latencies_ms) > 100_000:  # bounded between two CSV rows
                del stats.latencies_ms[::2]
        actions = entry.session.settled(record.type, record.seq, ok, time.time_ns())
        self.route_back(entry.session, entry.owner, actions)

    def route_back(
        self,
        session: core.SessionChannels,
        owner: Owner | None,
        actions: list[core.ChannelAction],
    ) -> None:
        """Ends go out; refusals go back to the session (if it is still there)."""
        rest: list[core.ChannelAction] = []
        for a in actions:
            if isinstance(a, core.PublishEnd):
                self.publish_end(session, a)
            else:
                rest.append(a)
        if rest and owner is not None:
            owner.channel_act(rest)
        self._forget_if_done(session)

    def _forget_if_done(self, session: core.SessionChannels) -> None:
        if session.done:
            self.sessions.discard(session)

    # figures ----------------------------------------------------------------------------------

    async def _write_csv(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.channels.csv_interval_s
        await loop.run_in_executor(None, _start_csv, path)
        while True:
            await asyncio.sleep(interval)
            rows = self._rows(interval)
            if rows:
                await loop.run_in_executor(None, _append, path, rows)

    def _rows(self, interval: float) -> list[str]:
        now = time.time()
        rows = []
        depth: Counter[str] = Counter()
        for out in self.outs.values():
            depth[out.label] += out.queued
        for label, st in sorted(self.by_type.items()):
            lat = sorted(st.latencies_ms)
            st.latencies_ms = []
            st.last_p50_ms = _quantile(lat, 0.5)
            st.last_p99_ms = _quantile(lat, 0.99)
            i = st.interval
            if not (i or depth[label] or self.sessions):
                continue  # an idle router writes nothing
            rows.append(
                f"{now:.3f},{label},{i['accepted'] / interval:.1f},{i['bytes'] / interval:.0f},"
                f"{depth[label]},{_ms(st.last_p50_ms)},{_ms(st.last_p99_ms)},"
                f"{i['refused']},{i['failed']}\n"
            )
            st.interval = Counter()
        return rows

    def queue_depth(self) -> Counter[str]:
        depth: Counter[str] = Counter()
        for out in self.outs.values():
            depth[out.label] += out.queued
        return depth


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def _start_csv(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        path.write_text(",".join(CSV_COLUMNS) + "\n")


def _append(path: Path, rows: list[str]) -> None:
    with open(path, "a") as f:
        f.writelines(rows)
