"""The simulator's HTTP shell: FastAPI signaling, health, Prometheus metrics, truth publishing.

Everything stateful is built in the lifespan and torn down there, in reverse: sessions first (so
no more truth is produced), then the truth producer is drained, then the Pulsar client and the
frame workers go.

Only the router may use the session API: ``carom_simulator.guard`` checks its token on the
headers, and bounds every body while it is read, before an offer costs anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import pulsar
from fastapi import FastAPI, Request, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import ClientDisconnect

from carom import schemas
from carom.signaling import OfferRequest, SessionControl
from carom_runtime.ice import set_host_addresses
from carom_runtime.pulsar_io import (
    LinkWatch,
    Publisher,
    connect_at_start,
    ensure_topics,
    make_client,
    make_publisher,
)
from carom_runtime.service import add_metrics, health_response
from carom_simulator import encoder
from carom_simulator.config import SimulatorSettings, access_refusal
from carom_simulator.guard import (
    BearerGate,
    BodyError,
    Refusal,
    TokenCheck,
    Verdict,
    problem_body,
    read_body,
)
from carom_simulator.origin import Stamped
from carom_simulator.sessions import SessionError, SessionManager

log = logging.getLogger("carom.simulator")

_offer_decoder = msgspec.json.Decoder(OfferRequest)
_control_decoder = msgspec.json.Decoder(SessionControl)
#: A control body with every field set is under 400 bytes.
_MAX_CONTROL_BYTES = 4096


@dataclass
class TruthOut:
    """Encodes each frame's record and hands it to Pulsar without waiting (bounded, counted).

    Everything a session says on the truth topic goes through here, on one producer keyed by the
    session, so it stays in order: its frames' ``Truth`` / ``NotSent``, then its ``SessionEnd``.
    """

    publisher: Publisher | None = None
    invalid: int = 0
    no_broker: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    def publisher_queued(self) -> int:
        """Truth accepted and not yet confirmed by the broker (memory + spool)."""
        return self.publisher.queued if self.publisher is not None else 0

    def __call__(self, sid: str, stamped: Stamped) -> None:
        """A frame due: its ``Truth`` if it was sent, its ``NotSent`` if it was skipped."""
        t = stamped.truth
        msg: schemas.Truth | schemas.NotSent
        try:
            if t.sent:
                msg = schemas.Truth(
                    session_id=sid, frame=t.frame, rtp_ts=stamped.rtp_ts, x=t.x, y=t.y,
                    t_render_ns=t.t_render_ns, latency=t.latency, phase=t.phase, width=t.width,
                    height=t.height,
                )  # fmt: skip
            else:
                msg = schemas.NotSent(
                    session_id=sid, frame=t.frame, rtp_ts=stamped.rtp_ts, t_due_ns=t.t_render_ns,
                    reason="late", latency=t.latency, phase=t.phase,
                )  # fmt: skip
        except ValueError:
            self.invalid += 1  # never publish garbage; counted for /metrics
            return
        self._publish(msg)

    def end(
        self,
        sid: str,
        frames_due: int,
        t_end_ns: int,
        reason: str,
        phases: list[schemas.PhaseSummary],
    ) -> None:
        """The session stopped after ``frames_due`` frames (its last record on the topic)."""
        self._publish(
            schemas.SessionEnd(
                session_id=sid,
                frames_due=frames_due,
                t_end_ns=t_end_ns,
                reason=reason[:200],
                phases=phases,
            )
        )

    def _publish(self, msg: schemas.Truth | schemas.NotSent | schemas.SessionEnd) -> None:
        if self.publisher is None:
            self.no_broker += 1
            return
        self.publisher.publish(schemas.encode(msg), msg.session_id)


class _Metrics(Collector):
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        mgr, out = self.state.sessions, self.state.truth
        yield GaugeMetricFamily("carom_simulator_sessions", "Live sessions", value=len(mgr))
        c = CounterMetricFamily(
            "carom_simulator_sessions_events", "Session events", labels=["event"]
        )
        for key, value in sorted(mgr.counters.items()):
            c.add_metric([key], value)
        yield c
        t = CounterMetricFamily(
            "carom_simulator_frames", "Frame and truth counters, all sessions", labels=["counter"]
        )
        for key, value in sorted(mgr.totals().items()):
            t.add_metric([key], value)
        yield t
        p = CounterMetricFamily(
            "carom_simulator_truth_messages", "Truth messages to Pulsar", labels=["outcome"]
        )
        pub = out.publisher
        p.add_metric(["sent"], pub.sent if pub else 0)
        p.add_metric(["acked"], pub.acked if pub else 0)
        p.add_metric(["failed"], pub.failed if pub else 0)
        p.add_metric(["dropped_backlog"], pub.dropped if pub else 0)
        p.add_metric(["resent"], pub.resent if pub else 0)  # by a producer made again
        p.add_metric(["dropped_no_broker"], out.no_broker)
        p.add_metric(["invalid"], out.invalid)
        yield p
        r = CounterMetricFamily(
            "carom_simulator_requests_rejected",
            "Requests refused before any work: token missing/wrong, body too big/slow/bad, busy",
            labels=["reason"],
        )
        for key, value in sorted(self.state.rejected.items()):
            r.add_metric([key], value)
        yield r
        yield GaugeMetricFamily(
            "carom_simulator_sessions_pending", "Offers being answered", value=mgr.pending
        )


@dataclass
class State:
    settings: SimulatorSettings
    sessions: SessionManager
    truth: TruthOut
    executor: ThreadPoolExecutor
    client: pulsar.Client | None = None
    publisher: Publisher | None = None
    link: LinkWatch = field(default_factory=lambda: LinkWatch("simulator", list))
    "Says when the broker is lost and back (replaced once the producer exists)."
    started: float = field(default_factory=time.monotonic)
    #: Requests refused at the door, by reason (see carom_simulator.guard).
    rejected: Counter[str] = field(default_factory=Counter)
    #: Offer bodies being read now; at most ``max_sessions`` (a slow body holds its buffer).
    reading: int = 0


def create_app(settings: SimulatorSettings) -> FastAPI:
    refusal = access_refusal(settings.access)
    if refusal is not None:
        raise ValueError(refusal)  # the service prints it and exits 2: never an open API by default
    set_host_addresses(settings.ice.host_addresses)
    encoder.install(settings.encoder_preset, settings.encoder_threads)
    executor = ThreadPoolExecutor(settings.frame_workers, thread_name_prefix="carom-frames")
    truth = TruthOut()
    sessions = SessionManager(settings, truth, executor, on_end=truth.end)
    state = State(settings, sessions, truth, executor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="carom-pulsar-setup") as setup:
            # Connecting blocks for up to the operation timeout: keep it off the event loop.
            client = make_client(settings.pulsar)

            def connect() -> Publisher:
                ensure_topics(settings.pulsar)  # partitioned, if the config says so
                # Truth is never dropped on a broker outage: memory, then a spool on disk.
                return make_publisher(
                    client,
                    settings.pulsar.topics.truth,
                    settings.pulsar,
                    "simulator",
                    producer_name="carom-simulator",
                )

            try:
                publisher = await loop.run_in_executor(
                    setup, connect_at_start, settings.pulsar, connect, "simulator"
                )
            except pulsar.PulsarException as exc:
                client.close()
                raise RuntimeError(f"cannot reach Pulsar at {settings.pulsar.url}: {exc}") from None
            state.client, state.publisher, truth.publisher = client, publisher, publisher
            # The producer's handle is the publisher's: another one after a replacement.
            state.link = LinkWatch(
                "simulator", lambda: [publisher.producer], truth.publisher_queued
            )
            state.link.start()
            log.info(
                "simulator ready: truth -> %s, codec %s, host addresses %s, session API %s",
                settings.pulsar.topics.truth,
                settings.codec,
                ",".join(settings.ice.host_addresses),
                "needs the access token" if settings.access.token else "OPEN (allow_no_token)",
            )
            try:
                yield
            finally:
                await state.sessions.close_all()
                pub = truth.publisher
                truth.publisher = None
                state.link.stop()
                await loop.run_in_executor(setup, pub.drain, 10.0)
                pub.close()
                await loop.run_in_executor(setup, client.close)
                executor.shutdown(wait=True, cancel_futures=True)
                log.info(
                    "simulator stopped: truth sent %d, acked %d, failed %d, dropped %d",
                    pub.sent,
                    pub.acked,
                    pub.failed,
                    pub.dropped,
                )

    app = FastAPI(title="Carom simulator", lifespan=lifespan)
    app.state.carom = state
    if settings.access.token:

        def refused(verdict: Verdict) -> None:
            state.rejected[f"token_{verdict}"] += 1

        app.add_middleware(BearerGate, check=TokenCheck(settings.access.token), on_refused=refused)

    def problem(status: int, detail: str) -> Response:
        """An error answer for a request whose body (if any) was read to its end."""
        return Response(problem_body(detail), status, media_type="application/json")

    @app.post("/offer")
    async def offer(request: Request) -> Response:
        """SDP offer + session id (+ parameters) -> SDP answer with H.264 video."""
        # Refusals before the body is read to its end answer at once and close (guard.refuse).
        try:
            state.sessions.check_capacity()  # a full simulator reads no body
        except SessionError as exc:
            return Refusal(exc.status, exc.detail)
        if state.reading >= settings.max_sessions:
            state.rejected["busy"] += 1
            return Refusal(503, "too many offers being received: try again later")
        state.reading += 1
        try:
            body = await read_body(
                request.stream(),
                request.headers.raw,
                settings.max_body_bytes,
                settings.body_timeout_s,
            )
        except BodyError as exc:
            state.rejected[exc.reason] += 1
            return Refusal(exc.status, exc.detail)
        except ClientDisconnect:
            state.rejected["client_gone"] += 1
            return Response(status_code=400)  # nobody is there to read it
        finally:
            state.reading -= 1
        try:
            req = _offer_decoder.decode(body)
        except msgspec.DecodeError as exc:
            state.sessions.counters["rejected_request"] += 1
            return problem(422, f"invalid offer request: {exc}")
        try:
            answer = await state.sessions.create(req)
        except SessionError as exc:
            return problem(exc.status, exc.detail)
        if await request.is_disconnected():
            # The client (the router, cancelled) left while its answer was made: nobody will
            # connect, so free the slot now instead of after the connect timeout.
            state.sessions.counters["abandoned"] += 1
            await state.sessions.close(req.session_id, reason="offer abandoned")
        return Response(msgspec.json.encode(answer), media_type="application/json")

    @app.patch("/sessions/{session_id}")
    async def control_session(session_id: str, request: Request) -> Response:
        """Stop, resume or change a running session (``carom.signaling.SessionControl``)."""
        try:
            body = await read_body(
                request.stream(), request.headers.raw, _MAX_CONTROL_BYTES, settings.body_timeout_s
            )
        except BodyError as exc:
            state.rejected[exc.reason] += 1
            return Refusal(exc.status, exc.detail)
        except ClientDisconnect:
            state.rejected["client_gone"] += 1
            return Response(status_code=400)
        try:
            change = _control_decoder.decode(body)
        except msgspec.DecodeError as exc:
            state.sessions.counters["control_rejected_request"] += 1
            return problem(422, f"invalid session control: {exc}")
        try:
            answer = await state.sessions.control(session_id, change)
        except SessionError as exc:
            return problem(exc.status, exc.detail)
        return Response(msgspec.json.encode(answer), media_type="application/json")

    @app.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> Response:
        if await state.sessions.close(session_id, reason="deleted"):
            return Response(status_code=204)
        return problem(404, f"no session {session_id!r}")

    @app.get("/sessions")
    async def list_sessions() -> Response:
        return Response(msgspec.json.encode(state.sessions.info()), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        publisher = state.publisher
        pulsar_ok = publisher is not None and publisher.producer.is_connected()
        body: dict[str, object] = {
            "status": "ok" if pulsar_ok else "degraded",
            "pulsar": "connected" if pulsar_ok else "disconnected",
            # Streaming goes on without the broker; its truth waits (memory, then disk).
            "truth_queued": truth.publisher_queued(),
            "sessions": len(state.sessions),
            "max_sessions": settings.max_sessions,
            "uptime_s": round(time.monotonic() - state.started, 1),
        }
        if not state.link.up:
            body["pulsar_down_for_s"] = round(state.link.down_for(), 1)
        return health_response(pulsar_ok, body)

    add_metrics(app, _Metrics(state))
    return app
