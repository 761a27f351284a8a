"""The router service: its WebTransport sessions, Pulsar in and out, the simulator, health.

Each WebTransport session gets a ``Link`` (``carom_router.link``) around a ``SessionCore``. Nothing
here blocks the loop: reports go to Pulsar with ``send_async`` (bounded, then spooled to disk
while the broker is away), the errors topic is read on a thread of its own
(``carom_runtime.pulsar_io.TopicReader``: every router instance reads every result and forwards
only its own sessions') and handed over in batches, and the simulator is called with an
async HTTP client.

The parts sessions depend on (broker, trackers, simulator) are watched here and judged by
``carom_router.status.Dependencies``: clients get a ``status`` message when one degrades or
recovers, and ``/health`` says which one and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import msgspec
import pulsar

from carom import protocol as p
from carom import schemas
from carom.signaling import auth_headers
from carom_router.certs import CertBundle, load_certificate, make_certificate, needs_renewal
from carom_router.channel_io import ChannelHub
from carom_router.config import RouterSettings
from carom_router.link import Link
from carom_router.session import Close, Limits, SendControl
from carom_router.status import Dependencies, SimulatorState
from carom_router.webtransport import SessionHandler, WebTransportSession, serve
from carom_runtime.pulsar_io import (
    LinkWatch,
    Publisher,
    TopicReader,
    connect_at_start,
    ensure_topics,
    make_client,
    make_publisher,
)

log = logging.getLogger("carom.router")

_json_decoder = msgspec.json.Decoder()

#: Sessions' ticks (hello timeout, pings, drains) and the trackers' silence are checked this often.
TICK_S = 0.05
#: How often the simulator's ``/health`` is asked, so clients hear of its faults (2 s: a client
#: learns within 2 s why its video froze, for one small request).
SIMULATOR_POLL_S = 2.0
#: A ``/health`` of the simulator that takes longer than this counts as down.
SIMULATOR_HEALTH_TIMEOUT_S = 2.0
#: QUIC connections one address may hold, as a multiple of ``max_sessions_per_address``: each
#: session is its own connection, and a closed one lingers a moment (handshakes, closes), so a
#: client at its session limit still gets a clear 429 rather than silence.
CONNECTIONS_PER_SESSION = 2
#: After sessions close, memory is handed back once the router has been quiet this long
#: (see ``Router._reclaim``).
RECLAIM_AFTER_S = 2.0


class Router:
    """The service: its sessions, Pulsar in and out, the simulator relay's client, health."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        #: Every session's limits: the ``limits`` settings section is a ``Limits``.
        self.limits: Limits = settings.limits
        self.origins = settings.origins()
        self.links: set[Link] = set()
        self.by_id: dict[str, Link] = {}
        #: Open sessions per client address; an address leaves when its last session closes.
        self.per_address: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.cert: CertBundle = self._certificate()
        token = settings.simulator.token
        self.http = httpx.AsyncClient(
            timeout=settings.simulator.timeout_s,
            headers=auth_headers(token),
        )
        self.deps = Dependencies(started=time.monotonic())
        #: Typed channels: the routes file is read here, so a bad one stops the start.
        self.channels = ChannelHub(settings)
        self.client: pulsar.Client | None = None
        self.publisher: Publisher | None = None
        self.errors: TopicReader | None = None
        self.link_watch: LinkWatch | None = None
        self._pending: deque[bytes] = deque()
        self._drain_scheduled = False
        self._lock = threading.Lock()
        self.server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed_since_reclaim = 0
        self._last_close = 0.0
        self._connections_ended = 0
        #: Called with each renewed certificate (the HTTPS listener serves it too).
        self.on_certificate: list[Callable[[CertBundle], None]] = []

    def _certificate(self) -> CertBundle:
        wt = self.settings.webtransport
        if wt.cert_file:
            return load_certificate(wt.cert_file, wt.key_file)
        hosts = sorted({"localhost", "127.0.0.1", "::1", wt.public_host} - {""})
        return make_certificate(days=wt.cert_days, hosts=tuple(hosts))

    # lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        client = self.client = make_client(s.pulsar)
        name = s.instance or f"carom-router-{time.time_ns() % 10**9:09d}"

        def connect() -> Publisher:
            ensure_topics(s.pulsar)  # partitioned, if the config says so
            # Reports a broker outage holds up wait on disk, never dropped (pulsar_io.Spool).
            return make_publisher(client, s.pulsar.topics.centroids, s.pulsar, name)

        try:
            # Connecting blocks for up to the operation timeout: keep it off the event loop.
            self.publisher = await loop.run_in_executor(
                None, connect_at_start, s.pulsar, connect, "router"
            )
        except pulsar.PulsarException as exc:
            self.client.close()
            raise RuntimeError(f"cannot reach Pulsar at {s.pulsar.url}: {exc}") from None
        await self.channels.start(client)
        self.errors = TopicReader(
            self.client, s.pulsar.topics.errors, lambda data: self.offer_error(data, loop), name
        )
        self.errors.start()
        publisher, errors = self.publisher, self.errors

        def on_change(up: bool, _outage_s: float) -> None:  # on LinkWatch's thread: hop over
            with contextlib.suppress(RuntimeError):  # the loop closed while stopping
                loop.call_soon_threadsafe(self._broker_changed, up)

        self.link_watch = LinkWatch(
            "router",
            lambda: [publisher.producer, errors.reader],  # another after a replacement
            queued=lambda: publisher.queued,
            on_change=on_change,
            logger=log,
        )
        self.link_watch.start()
        self.server = await serve(
            s.webtransport.hosts, s.webtransport.port, self.cert, self.accept,
            path=s.webtransport.path,
            max_connections_per_address=CONNECTIONS_PER_SESSION
            * s.limits.max_sessions_per_address,
        )  # fmt: skip
        self._tasks = [loop.create_task(self._tick()), loop.create_task(self._watch_simulator())]
        # What is loaded by now lives as long as the process: keep it out of every collection,
        # so the ones that follow sessions' ends scan only what sessions left (see _reclaim).
        gc.collect()
        gc.freeze()
        log.info(
            "router ready: %s (cert sha256 %s, valid to %s), reports -> %s",
            self.webtransport_url(),
            self.cert.sha256_hex,
            self.cert.not_after.isoformat(),
            s.pulsar.topics.centroids,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.link_watch is not None:
            self.link_watch.stop()
        for link in list(self.links):
            link.wt.close(p.CLOSE_NORMAL, "router shutting down")
            self.forget(link, "shutdown")
        await asyncio.sleep(0.1)  # let the close frames out
        await self.channels.stop()  # the sessions' channel ends out before the client closes
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        if self.errors is not None:
            self.errors.halt.set()
            await loop.run_in_executor(None, self.errors.join, 2.0)
        if self.publisher is not None:
            await loop.run_in_executor(None, self.publisher.drain, 10.0)
            await loop.run_in_executor(None, self.publisher.close)
        if self.client is not None:
            await loop.run_in_executor(None, self.client.close)
        await self.http.aclose()

    def webtransport_url(self, request_host: str = "") -> str:
        """The URL handed to a page: ``webtransport.public_host``, or else the host the page's
        own request named (``request_host``, e.g. its Host header without the port), so a browser
        on another machine comes back to the address it used."""
        wt = self.settings.webtransport
        host = wt.public_host or request_host or "<the page's host>"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"https://{host}:{wt.port}{wt.path}"

    # sessions -------------------------------------------------------------------------------

    def accept(
        self, wt: WebTransportSession, headers: Mapping[str, str]
    ) -> SessionHandler | tuple[int, str]:
        origin = headers.get("origin")
        if origin is None:
            if not self.settings.access.allow_missing_origin:
                self.counters["refused_no_origin"] += 1
                return (403, "an Origin header is required")
        elif not self.settings.origin_allowed(origin, headers.get(":authority", ""), self.origins):
            self.counters["refused_origin"] += 1
            return (403, f"origin {origin} is not allowed")
        limits = self.settings.limits
        address = str(wt.peer[0]) if wt.peer else ""
        if self.per_address[address] >= limits.max_sessions_per_address:
            self.counters["refused_per_address"] += 1
            return (429, f"too many sessions from {address} ({limits.max_sessions_per_address})")
        if len(self.links) >= limits.max_sessions:
            self.counters["refused_capacity"] += 1
            return (503, f"session limit reached ({limits.max_sessions})")
        link = Link(self, wt, address)
        self.links.add(link)
        self.per_address[address] += 1
        self.counters["sessions_opened"] += 1
        return link

    def register(self, link: Link) -> None:
        """The session said hello: route its results by its id."""
        sid = link.core.session_id
        assert sid is not None
        if link not in self.links:
            # Closed in the same chunk as its hello (a hello, then a flood of bad frames): it was
            # forgotten already, and registering it now would keep it, its connection and its id
            # for good (found so: three such sessions held 7 MB after the attacks ended).
            return
        if sid in self.by_id:
            self.counters["refused_duplicate_id"] += 1
            err = p.frame(
                p.Error(code="session_exists", message=f"session {sid} is already open", fatal=True)
            )
            link.act([SendControl(err), Close("duplicate session id", p.CLOSE_PROTOCOL_ERROR)])
            return
        self.by_id[sid] = link
        for status in self.deps.degraded():  # what is wrong right now, before it is asked
            link.act(link.core.notify(status))

    def forget(self, link: Link, reason: str) -> None:
        if link not in self.links:
            return
        self.links.discard(link)
        self.per_address[link.address] -= 1
        if self.per_address[link.address] <= 0:
            del self.per_address[link.address]  # keyed by live sessions only: bounded
        sid = link.core.session_id
        if sid is not None and self.by_id.get(sid) is link:
            del self.by_id[sid]
        self.counters["sessions_closed"] += 1
        link.end_channels(reason)
        for k, v in link.core.counters.items():
            self.counters[f"session_{k}"] += v
        emulated = link.wt.impairment_counts()
        if emulated is not None:  # what the emulated network did, beside what was configured
            for path, c in zip(("reports", "results"), emulated, strict=True):
                self.counters[f"impaired_{path}_packets"] += c.packets
                self.counters[f"impaired_{path}_lost"] += c.lost + c.queue_full
            log.info("session %s's emulated network: reports %s, results %s", sid, *emulated)
        self._closed_since_reclaim += 1
        self._last_close = time.monotonic()
        asyncio.get_running_loop().create_task(link.end())
        log.info("session %s closed: %s", sid or "(before hello)", reason)

    def broadcast(self, statuses: list[p.Status]) -> None:
        """Tell every open session (that has said hello) of each change."""
        for status in statuses:
            log.warning("clients told: %s %s: %s", status.part, status.state, status.detail)
            self.counters[f"status_{status.part}_{status.state}"] += 1
            for link in list(self.links):
                link.act(link.core.notify(status))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._tick_once()

    def _tick_once(self) -> None:
        # A function of its own: a loop variable in _tick's frame would keep the last session
        # iterated (and its whole QUIC connection) alive after it closed.
        now = time.time_ns()
        for link in list(self.links):
            link.tick(now)
        mono = time.monotonic()
        self.broadcast(self.deps.tick(mono))
        if self.server is not None:  # QUIC connections end a moment after their sessions
            ended = self.server.counters["connections"] - self.server.connections_open
            if ended != self._connections_ended:
                self._connections_ended = ended
                self._closed_since_reclaim += 1
                self._last_close = mono
        if self._closed_since_reclaim and mono - self._last_close >= RECLAIM_AFTER_S:
            self._reclaim()

    def _reclaim(self) -> None:
        """Hand memory that closed sessions used back to the system.

        Sessions' QUIC state is freed in reference cycles (aioquic's connection callbacks), which
        only the cyclic collector frees, and a quiet router allocates too little to trigger it;
        what is freed then stays with the C allocator. Measured, four rounds of attacks (50,000
        bad frames, 300 CONNECTs from one address, with the per-address limits): RSS 80 -> 100
        MB 30 s later without this, 90 MB with ``gc.collect`` alone, 85 MB with ``malloc_trim``
        too. (Before the limits, the same rounds took it from 79 to 136 MB.)

        Runs once neither sessions nor QUIC connections have ended for ``RECLAIM_AFTER_S``: a
        connection ends a second or two after its session (linger, closing period), and its
        state is what weighs. The collection scans only what was allocated since start-up
        (``gc.freeze`` in ``start``), so it costs the loop little.
        """
        self._closed_since_reclaim = 0
        t0 = time.perf_counter()
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)
        self.counters["memory_reclaims"] += 1
        log.debug("memory reclaimed in %.1f ms", (time.perf_counter() - t0) * 1000)

    # dependencies ---------------------------------------------------------------------------

    def _broker_changed(self, up: bool) -> None:
        """On the loop: the broker link went down or came back (from ``LinkWatch``'s thread)."""
        queued = self.publisher.queued if self.publisher is not None else 0
        self.broadcast(self.deps.broker(up, time.monotonic(), queued))

    async def _watch_simulator(self) -> None:
        while True:
            await self.check_simulator()
            await asyncio.sleep(SIMULATOR_POLL_S)

    async def check_simulator(self) -> None:
        """Ask the simulator's ``/health``: 200 up, 503 degraded (its reason), else down."""
        state: SimulatorState
        try:
            r = await self.http.get(
                f"{self.settings.simulator.url}/health", timeout=SIMULATOR_HEALTH_TIMEOUT_S
            )
        except httpx.TimeoutException:
            state, detail = "down", f"no answer within {SIMULATOR_HEALTH_TIMEOUT_S:g} s"
        except httpx.HTTPError as exc:
            state, detail = "down", f"{type(exc).__name__}: {exc}"[:200]
        else:
            if r.status_code == 200:
                state, detail = "up", ""
            elif r.status_code == 503:
                state, detail = "degraded", _health_reason(r)
            else:
                state, detail = "down", f"HTTP {r.status_code}: {_health_reason(r)}"
        self.broadcast(self.deps.simulator(state, detail))

    # Pulsar ---------------------------------------------------------------------------------

    def publish(self, msg: schemas.Centroid | schemas.ClientStats) -> None:
        """To the centroid topic, keyed by session: reports and the page's stats go the same way
        (the same order per key, the same spool through a broker outage)."""
        what = "reports"
        if isinstance(msg, schemas.Centroid):
            msg = msgspec.structs.replace(msg, t_published_ns=time.time_ns())
        else:
            what = "client_stats"
        if self.publisher is None:
            self.counters[f"{what}_no_broker"] += 1
            return
        if not self.publisher.publish(schemas.encode(msg), msg.session_id):
            self.counters[f"{what}_dropped_backlog"] += 1

    def offer_error(self, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the reader thread: queue (bounded) and make sure a drain is scheduled."""
        with self._lock:
            if len(self._pending) >= self.settings.limits.max_pending_errors:
                self.counters["errors_dropped_backlog"] += 1
                return
            self._pending.append(data)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            batch = list(self._pending)
            self._pending.clear()
            self._drain_scheduled = False
        for data in batch:
            try:
                result = schemas.decode_errors_topic(data)
            except schemas.SchemaError:
                self.counters["errors_invalid"] += 1
                continue
            if isinstance(result, schemas.TrackerStatus):
                self.counters["tracker_statuses"] += 1
                self.broadcast(
                    self.deps.tracker_seen(
                        result.tracker,
                        result.interval_ms / 1000,
                        result.behind_ms,
                        time.monotonic(),
                    )
                )
                continue
            link = self.by_id.get(result.session_id)
            if link is None:
                self.counters["errors_other_sessions"] += 1
                continue
            if isinstance(result, schemas.SessionResults):
                # After the session's last result on the same key: everything is delivered.
                done = link.core.results_done(result.frames_due, time.time_ns(), result.reason)
                link.act(done)
                continue
            each = schemas.results_in(result)  # one, or a tracker commit's several, in order
            self.counters["errors_forwarded"] += len(each)
            for one in each:
                link.deliver(one)

    # health ---------------------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, object]]:
        """Each part's state (``carom_router.status``); ok only when every one is up."""
        await self.check_simulator()
        now = time.monotonic()
        queued = self.publisher.queued if self.publisher is not None else 0
        body = self.deps.report(now, queued)
        body["sessions"] = len(self.links)
        return self.deps.all_up(now), body

    async def renew_certificates(self) -> None:
        """Swap in a fresh certificate before the current one expires (generated ones only)."""
        wt = self.settings.webtransport
        while not wt.cert_file:
            await asyncio.sleep(3600)
            from datetime import UTC, datetime, timedelta

            if needs_renewal(self.cert, datetime.now(UTC), timedelta(days=wt.renew_before_days)):
                self.cert = self._certificate()
                if self.server is not None:
                    self.server.set_certificate(self.cert)
                for hook in self.on_certificate:
                    hook(self.cert)
                log.info("certificate renewed: sha256 %s", self.cert.sha256_hex)


def _health_reason(r: httpx.Response) -> str:
    """A short reason from a ``/health`` body: its ``detail`` or ``reason``, else its non-ok
    parts (the simulator says ``{"status": "degraded", "pulsar": "disconnected", ...}``)."""
    try:
        body = _json_decoder.decode(r.content)
    except msgspec.DecodeError:
        return r.text.strip()[:200] or f"HTTP {r.status_code}"
    if isinstance(body, dict):
        for key in ("detail", "reason"):
            if isinstance(body.get(key), str):
                return str(body[key])[:200]
        parts = [f"{k}: {v}" for k, v in body.items() if k != "status" and isinstance(v, str)]
        if parts:
            return ", ".join(parts)[:200]
    return r.text.strip()[:200] or f"HTTP {r.status_code}"


def _libc_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (returns freed heap to the system), or None on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_malloc_trim()
