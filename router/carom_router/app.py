"""The router's asyncio shell: WebTransport sessions, the simulator relay, Pulsar in and out, HTTP.

Each WebTransport session gets a ``SessionCore`` (the protocol, pure) and a ``Link`` that performs
the core's actions. Nothing here blocks the loop: reports go to Pulsar with ``send_async``
(bounded, counted), the errors topic is read on a thread of its own and handed over in batches,
and the simulator is called with an async HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pulsar
from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carom import protocol as p
from carom import schemas
from carom.pulsar_io import Publisher, make_client, make_producer
from carom.signaling import SessionParams
from carom_router.certs import CertBundle, load_certificate, make_certificate, needs_renewal
from carom_router.config import RouterSettings
from carom_router.session import (
    Close,
    Limits,
    Publish,
    RelayOffer,
    SendControl,
    SessionCore,
    StopStream,
)
from carom_router.webtransport import SessionHandler, WebTransportSession, serve

log = logging.getLogger("carom.router")

REPO_PAGE = Path(__file__).resolve().parents[2] / "live_client.html"
_answer_decoder = msgspec.json.Decoder(dict[str, Any])


class Link(SessionHandler):
    """One WebTransport session: feeds the core and carries out what it decides."""

    def __init__(self, router: Router, wt: WebTransportSession) -> None:
        self.router = router
        self.wt = wt
        self.core = SessionCore(router.limits, created_ns=time.time_ns())
        self.control_stream: int | None = None
        self.relayed = False
        self._tasks: set[asyncio.Task[None]] = set()

    # SessionHandler -------------------------------------------------------------------------

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self.control_stream is None:
            self.control_stream = stream_id
        if stream_id != self.control_stream:
            self.router.counters["extra_streams"] += 1
            return
        now = time.time_ns()
        had_id = self.core.session_id
        self.act(self.core.control(data, now))
        if had_id is None and self.core.session_id is not None:
            self.router.register(self)
        if end_stream:
            self.act(self.core.control_closed())

    def datagram(self, data: bytes) -> None:
        self.act(self.core.datagram(data, time.time_ns()))

    def closed(self, reason: str) -> None:
        self.act(self.core.control_closed())
        self.router.forget(self, reason)

    # actions --------------------------------------------------------------------------------

    def act(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self.router.publish(a.message)
            elif isinstance(a, SendControl):
                if self.control_stream is not None:
                    self.wt.send_stream(self.control_stream, a.data)
            elif isinstance(a, RelayOffer):
                self.relayed = True
                self._spawn(self._relay(a))
            elif isinstance(a, StopStream):
                self._spawn(self._stop_stream(a.session_id))
            elif isinstance(a, Close):
                self.wt.close(a.code, a.reason)
                self.router.forget(self, a.reason)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, offer: RelayOffer) -> None:
        body = {
            "session_id": offer.session_id,
            "sdp": offer.sdp,
            "params": msgspec.to_builtins(offer.params),
        }
        try:
            r = await self.router.http.post(
                f"{self.router.settings.simulator.url}/offer", json=body
            )
        except httpx.HTTPError as exc:
            self.act(self.core.relay_failed("simulator_unavailable", f"simulator: {exc!r}"))
            return
        if r.status_code != 200:
            try:
                detail = str(r.json().get("detail", r.text))
            except ValueError:
                detail = r.text[:300]
            self.act(self.core.relay_failed(f"simulator_{r.status_code}", detail))
            return
        answer = _answer_decoder.decode(r.content)
        params = msgspec.convert(answer.get("params", {}), SessionParams)
        self.act(self.core.relay_done(str(answer["sdp"]), str(answer.get("codec", "")), params))

    async def _stop_stream(self, sid: str) -> None:
        """DELETE the simulator's session: its track stops and its truth ends with SessionEnd."""
        try:
            await self.router.http.delete(f"{self.router.settings.simulator.url}/sessions/{sid}")
        except httpx.HTTPError as exc:
            log.warning("session %s: could not stop the simulator's stream: %r", sid, exc)

    def deliver(self, result: schemas.ErrorResult) -> None:
        if not self.wt.send_datagram(p.encode_error(result)):
            self.router.counters["errors_not_sent"] += 1

    def tick(self, now_ns: int) -> None:
        self.act(self.core.tick(now_ns))

    async def end(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        # Again after a StopStream too: that DELETE may have been cancelled above (404 if not).
        if self.relayed and self.core.session_id is not None:
            with contextlib.suppress(httpx.HTTPError):
                await self.router.http.delete(
                    f"{self.router.settings.simulator.url}/sessions/{self.core.session_id}"
                )


class ErrorsReader(threading.Thread):
    """Reads the errors topic on its own thread; the loop drains what it found in batches.

    A reader (non-durable, from the latest message) per router instance: every instance sees
    every result and forwards only its own sessions', so instances never steal each other's.
    """

    def __init__(self, client: pulsar.Client, topic: str, name: str, router: Router) -> None:
        super().__init__(daemon=True, name="carom-errors-reader")
        self.reader = client.create_reader(topic, pulsar.MessageId.latest, reader_name=name)
        self.router = router
        self.loop = asyncio.get_running_loop()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                msg = self.reader.read_next(200)
            except pulsar.Timeout:
                continue
            except pulsar.PulsarException:
                if self.halt.is_set():
                    return
                time.sleep(0.5)
                continue
            self.router.offer_error(msg.data(), self.loop)


class Router:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.limits = Limits(
            max_report_rate=settings.limits.max_report_rate,
            report_burst=settings.limits.report_burst,
            hello_timeout_s=settings.limits.hello_timeout_s,
            ping_interval_s=settings.limits.ping_interval_s,
            drain_timeout_s=settings.limits.drain_timeout_s,
        )
        self.origins = settings.origins()
        self.links: set[Link] = set()
        self.by_id: dict[str, Link] = {}
        self.counters: Counter[str] = Counter()
        self.cert: CertBundle = self._certificate()
        self.http = httpx.AsyncClient(timeout=settings.simulator.timeout_s)
        self.client: pulsar.Client | None = None
        self.producer: pulsar.Producer | None = None
        self.publisher: Publisher | None = None
        self.errors: ErrorsReader | None = None
        self._pending: deque[bytes] = deque()
        self._drain_scheduled = False
        self._lock = threading.Lock()
        self.server: Any = None
        self._ticker: asyncio.Task[None] | None = None

    def _certificate(self) -> CertBundle:
        wt = self.settings.webtransport
        if wt.cert_file:
            return load_certificate(wt.cert_file, wt.key_file)
        hosts = sorted({"localhost", "127.0.0.1", "::1", wt.public_host})
        return make_certificate(days=wt.cert_days, hosts=tuple(hosts))

    # lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        client = self.client = make_client(s.pulsar)
        try:
            # Connecting blocks for up to the operation timeout: keep it off the event loop.
            self.producer = await loop.run_in_executor(
                None, lambda: make_producer(client, s.pulsar.topics.centroids, s.pulsar, None)
            )
        except pulsar.PulsarException as exc:
            self.client.close()
            raise RuntimeError(f"cannot reach Pulsar at {s.pulsar.url}: {exc}") from None
        self.publisher = Publisher(self.producer, s.pulsar.max_pending_messages)
        name = s.instance or f"carom-router-{time.time_ns() % 10**9:09d}"
        self.errors = ErrorsReader(self.client, s.pulsar.topics.errors, name, self)
        self.errors.start()
        self.server = await serve(
            s.webtransport.hosts, s.webtransport.port, self.cert, self.accept,
            path=s.webtransport.path,
        )  # fmt: skip
        self._ticker = loop.create_task(self._tick())
        log.info(
            "router ready: %s (cert sha256 %s, valid to %s), reports -> %s",
            self.webtransport_url,
            self.cert.sha256_hex,
            self.cert.not_after.isoformat(),
            s.pulsar.topics.centroids,
        )

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for link in list(self.links):
            link.wt.close(0, "router shutting down")
            self.forget(link, "shutdown")
        await asyncio.sleep(0.1)  # let the close frames out
        if self.server is not None:
            self.server.close()
        if self.errors is not None:
            self.errors.halt.set()
            await asyncio.get_running_loop().run_in_executor(None, self.errors.join, 2.0)
        if self.publisher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.publisher.drain, 10.0)
        if self.client is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.client.close)
        await self.http.aclose()

    @property
    def webtransport_url(self) -> str:
        wt = self.settings.webtransport
        host = f"[{wt.public_host}]" if ":" in wt.public_host else wt.public_host
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
        elif origin not in self.origins:
            self.counters["refused_origin"] += 1
            return (403, f"origin {origin} is not allowed")
        if len(self.links) >= self.settings.limits.max_sessions:
            self.counters["refused_capacity"] += 1
            return (503, f"session limit reached ({self.settings.limits.max_sessions})")
        link = Link(self, wt)
        self.links.add(link)
        self.counters["sessions_opened"] += 1
        return link

    def register(self, link: Link) -> None:
        sid = link.core.session_id
        assert sid is not None
        if sid in self.by_id:
            self.counters["refused_duplicate_id"] += 1
            err = p.frame(
                p.Error(code="session_exists", message=f"session {sid} is already open", fatal=True)
            )
            link.act([SendControl(err), Close("duplicate session id", 1)])
            return
        self.by_id[sid] = link

    def forget(self, link: Link, reason: str) -> None:
        if link not in self.links:
            return
        self.links.discard(link)
        sid = link.core.session_id
        if sid is not None and self.by_id.get(sid) is link:
            del self.by_id[sid]
        self.counters["sessions_closed"] += 1
        for k, v in link.core.counters.items():
            self.counters[f"session_{k}"] += v
        asyncio.get_running_loop().create_task(link.end())
        log.info("session %s closed: %s", sid or "(before hello)", reason)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.time_ns()
            for link in list(self.links):
                link.tick(now)

    # Pulsar ---------------------------------------------------------------------------------

    def publish(self, msg: schemas.Centroid) -> None:
        if self.publisher is None:
            self.counters["reports_no_broker"] += 1
            return
        stamped = msgspec.structs.replace(msg, t_published_ns=time.time_ns())
        if not self.publisher.publish(schemas.encode(stamped), msg.session_id):
            self.counters["reports_dropped_backlog"] += 1

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
            link = self.by_id.get(result.session_id)
            if link is None:
                self.counters["errors_other_sessions"] += 1
                continue
            if isinstance(result, schemas.SessionResults):
                # After the session's last result on the same key: everything is delivered.
                link.act(link.core.results_done(result.frames_due, time.time_ns()))
                continue
            self.counters["errors_forwarded"] += 1
            link.deliver(result)

    # health ---------------------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, object]]:
        pulsar_ok = self.producer is not None and self.producer.is_connected()
        try:
            r = await self.http.get(f"{self.settings.simulator.url}/health", timeout=2.0)
            sim_ok = r.status_code == 200
        except httpx.HTTPError:
            sim_ok = False
        body: dict[str, object] = {
            "status": "ok" if pulsar_ok and sim_ok else "degraded",
            "pulsar": "connected" if pulsar_ok else "disconnected",
            "simulator": "reachable" if sim_ok else "unreachable",
            "sessions": len(self.links),
        }
        return pulsar_ok and sim_ok, body

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
                log.info("certificate renewed: sha256 %s", self.cert.sha256_hex)


class _Metrics(Collector):
    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        r = self.router
        yield GaugeMetricFamily("carom_router_sessions", "Open sessions", value=len(r.links))
        rejected = CounterMetricFamily(
            "carom_router_reports_rejected", "Reports dropped, by reason", labels=["reason"]
        )
        events = CounterMetricFamily("carom_router_events", "Router events", labels=["event"])
        totals = Counter(r.counters)
        for link in r.links:
            for k, v in link.core.counters.items():
                totals[f"session_{k}"] += v
        for key, value in sorted(totals.items()):
            if key.startswith("session_invalid_"):
                rejected.add_metric([key.removeprefix("session_invalid_")], value)
            else:
                events.add_metric([key], value)
        yield rejected
        yield events
        transport = CounterMetricFamily(
            "carom_router_webtransport", "WebTransport/QUIC layer counters", labels=["counter"]
        )
        if r.server is not None:
            for key, value in sorted(r.server.counters.items()):
                transport.add_metric([key], value)
        yield transport
        pub = r.publisher
        out = CounterMetricFamily(
            "carom_router_reports_published", "Reports to Pulsar", labels=["outcome"]
        )
        for name in ("sent", "acked", "failed", "dropped"):
            out.add_metric([name], getattr(pub, name) if pub else 0)
        yield out
        browser = GaugeMetricFamily(
            "carom_router_browser_stats",
            "WebRTC receiver stats the page sends (getStats)",
            labels=["session", "stat"],
        )
        for link in r.links:
            st = link.core.stats
            if st is None or not link.core.session_id:
                continue
            for name in (
                "fps",
                "jitter_buffer_ms",
                "decode_ms",
                "frames_decoded",
                "frames_dropped",
            ):
                value = getattr(st, name)
                if value is not None:
                    browser.add_metric([link.core.session_id, name], float(value))
        yield browser
        clock = GaugeMetricFamily(
            "carom_router_clock_offset_ms", "Server - client clock offset", labels=["session"]
        )
        for link in r.links:
            if link.core.session_id and link.core.clock.known:
                clock.add_metric([link.core.session_id], link.core.clock.offset_ns / 1e6)
        yield clock


def create_http_app(router: Router) -> FastAPI:
    """The HTTP side; its lifespan runs the whole router (QUIC, Pulsar, renewal) with uvicorn's
    signal handling and graceful shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        renew = asyncio.get_running_loop().create_task(router.renew_certificates())
        try:
            yield
        finally:
            renew.cancel()
            await router.stop()
            log.info("router stopped: %s", dict(sorted(router.counters.items())))

    app = FastAPI(title="Carom router", lifespan=lifespan)
    registry = CollectorRegistry()
    registry.register(_Metrics(router))
    page = Path(router.settings.page) if router.settings.page else REPO_PAGE

    @app.get("/")
    async def index() -> Response:
        if not page.exists():
            return Response(f"page not found: {page}", 404)
        # COOP/COEP give the page 5 us performance.now() instead of 100 us.
        return FileResponse(
            page,
            media_type="text/html",
            headers={
                "Cross-Origin-Opener-Policy": "same-origin",
                "Cross-Origin-Embedder-Policy": "require-corp",
                "Cache-Control": "no-store",
            },
        )

    @app.get("/config")
    async def config() -> Response:
        body = {
            "webtransport_url": router.webtransport_url,
            "cert_sha256_hex": router.cert.sha256_hex,
            "cert_sha256_b64": router.cert.sha256_b64,
            "cert_not_after": router.cert.not_after.isoformat(),
            "protocol": p.PROTOCOL_VERSION,
            "max_report_rate": router.settings.limits.max_report_rate,
        }
        return Response(
            msgspec.json.encode(body),
            media_type="application/json",
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"},
        )

    @app.get("/health")
    async def health() -> Response:
        ok, body = await router.health()
        return Response(
            msgspec.json.encode(body), 200 if ok else 503, media_type="application/json"
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
