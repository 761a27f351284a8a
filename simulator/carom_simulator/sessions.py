"""Sessions: one peer connection + one ball track per browser, created from an SDP offer.

Every way a session can end (DELETE, peer gone, ICE failure, connect timeout, shutdown) goes
through ``SessionManager.close``, which stops the track, closes the peer connection and forgets
the session, so nothing is left behind.

A slot is held from the moment an offer is taken until the session ends, so each way an offer
can fail to become a watched session frees it without waiting for anyone:

- no "connected" within ``connect_timeout_s`` of the answer (5 s; it was 30 s, and 100 offers
  that never connected held 15 of 16 slots for that long, issue 14);
- a DELETE that arrives while its offer is still being answered (the router gave up and ended
  the session before the answer came back): the answer, once made, is thrown away;
- an offer whose HTTP client left before its answer (``app.py`` closes it at once).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path

import av
import msgspec
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from carom.schemas import PhaseSummary, playout_delay
from carom.signaling import (
    Answer,
    OfferRequest,
    SessionControl,
    SessionInfo,
    SessionParams,
    SessionState,
    StreamState,
)
from carom_runtime.ice import strip_mdns_candidates
from carom_runtime.impair import ImpairedIce
from carom_simulator import playout
from carom_simulator.background import (
    PLAIN,
    check_background,
    measure_interference,
    open_background,
    resolve_background,
)
from carom_simulator.codecs import CodecUnavailable, force_codec, offer_codecs
from carom_simulator.config import SimulatorSettings
from carom_simulator.origin import Stamped
from carom_simulator.physics import PhysicsParams
from carom_simulator.track import BackgroundOpener, BallTrack, Spec, TruthCallback

log = logging.getLogger("carom.simulator")

#: Seconds after a track's first frame in which lateness moves its timeline instead of skipping
#: frames (aiortc's cold start, see carom_simulator.track).
STARTUP_GRACE_S = 0.5
#: Background warnings kept (one per background name and session size).
_MAX_WARNINGS = 64

TruthSink = Callable[[str, Stamped], None]
"""``(session_id, frame record)``: a frame due (sent, or skipped: see ``BallTrack``); the record
carries the playout mode it was due in (``PendingTruth.latency``)."""
EndSink = Callable[[str, int, int, str, list[PhaseSummary]], None]
"""``(session_id, frames_due, t_end_ns, reason, phases)``: the session's stream stopped; called
after its last truth, so the tracker can tell when every frame due has its row."""


#: At a session's end, how long its emulated media path may take to send what it still holds.
DRAIN_EMULATED_S = 3.0


class SessionError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass
class Session:
    session_id: str
    pc: RTCPeerConnection
    track: BallTrack
    params: SessionParams
    #: The sender's playout-delay writer; None when the browser did not offer the extension (the
    #: playout mode in force is the track's phase's: ``Spec.latency``).
    delay_writer: playout.PlayoutDelayMap | None
    created_ns: int = field(default_factory=time.time_ns)
    watchdog: asyncio.Task[None] | None = None
    #: The session's emulated media path (``params.network``'s ``media``); None: a clear one.
    network: ImpairedIce | None = None


def resolve_params(settings: SimulatorSettings, requested: SessionParams) -> SessionParams:
    """Fill a session's parameters from the configured defaults."""
    merged = {
        key: getattr(settings.defaults, key) if value is None else value
        for key, value in msgspec.structs.asdict(requested).items()
    }
    if merged["seed"] is None:
        merged["seed"] = random.SystemRandom().randrange(2**31)
    return SessionParams(**merged)


def spec_of(p: SessionParams) -> Spec:
    """What a session's frames are made with, from its resolved parameters."""
    assert p.bitrate is not None and p.keyframe_interval is not None
    assert p.background is not None and p.latency is not None
    return Spec(
        physics_params(p),
        bitrate=p.bitrate,
        keyframe_interval=p.keyframe_interval,
        background=p.background,
        latency=p.latency,
        network=p.impairment.name,
    )


def physics_params(p: SessionParams) -> PhysicsParams:
    assert p.fps is not None and p.width is not None and p.height is not None
    assert p.radius is not None and p.gravity is not None and p.vx is not None
    assert p.vy is not None and p.cor is not None and p.seed is not None
    return PhysicsParams(
        fps=p.fps,
        gravity=p.gravity,
        vx=p.vx,
        vy=p.vy,
        cor=p.cor,
        radius=p.radius,
        width=p.width,
        height=p.height,
        seed=p.seed,
    )


class SessionManager:
    def __init__(
        self,
        settings: SimulatorSettings,
        on_truth: TruthSink,
        executor: Executor,
        *,
        on_end: EndSink | None = None,
        backgrounds: BackgroundOpener | None = None,
    ) -> None:
        self._settings = settings
        self._on_truth = on_truth
        self._on_end = on_end
        if backgrounds is None:
            cfg = settings.backgrounds
            backgrounds = functools.partial(
                open_background,
                directory=Path(cfg.directory).expanduser() if cfg.directory else None,
                cache_dir=Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None,
            )
        self._backgrounds = backgrounds
        #: ``_background_warning``'s answers by (name, width, height), bounded.
        self._warnings: dict[tuple[str, int, int], str] = {}
        self._executor = executor
        self._sessions: dict[str, Session] = {}
        self._pending: set[str] = set()
        #: Pending offers deleted before their answer was ready (a subset of ``_pending``).
        self._doomed: set[str] = set()
        self.counters: Counter[str] = Counter()
        #: Totals of sessions that have ended, so /metrics counters never go backwards.
        self.finished_stats: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def _reject(self, status: int, reason: str, detail: str) -> SessionError:
        self.counters[f"rejected_{reason}"] += 1
        return SessionError(status, reason, detail)

    @property
    def pending(self) -> int:
        """Offers being answered: they hold a slot each, like sessions."""
        return len(self._pending)

    def check_capacity(self) -> None:
        """SessionError 503 when every slot is taken (before an offer's body is even read)."""
        if len(self._sessions) + len(self._pending) >= self._settings.max_sessions:
            raise self._reject(
                503,
                "capacity",
                f"session cap reached ({self._settings.max_sessions} sessions): try again later",
            )

    async def create(self, req: OfferRequest) -> Answer:
        sid = req.session_id
        if sid in self._sessions or sid in self._pending:
            raise self._reject(409, "duplicate", f"session {sid!r} already exists")
        self.check_capacity()
        params = resolve_params(self._settings, req.params)
        latency = params.latency
        assert latency is not None  # filled from the defaults
        if latency != "smooth" and playout.offered_id(req.sdp) is None:
            # Honest labels: without the extension the browser smooths, whatever was asked.
            self.counters["playout_not_offered"] += 1
            log.info(
                "session %s asked for latency %s but its offer has no playout-delay extension: "
                "smooth",
                sid,
                latency,
            )
            latency = "smooth"
            params = msgspec.structs.replace(params, latency=latency)
        warning = ""
        if params.background != PLAIN:  # may generate a clip: the slot is held meanwhile
            self._pending.add(sid)
            try:
                warning = await self._background_warning(params)
            finally:
                self._pending.discard(sid)
        try:
            track = BallTrack(
                sid,
                replace(spec_of(params), warning=warning),
                self._truth_for(sid),
                executor=self._executor,
                backgrounds=self._backgrounds,
                startup_grace_s=STARTUP_GRACE_S,
            )
        except ValueError as exc:
            raise self._reject(422, "params", f"invalid session parameters: {exc}") from None
        codec = self._settings.codec
        offered = offer_codecs(req.sdp)
        if not offered:
            raise self._reject(400, "sdp", "the offer has no video m-section")
        if codec not in offered:
            raise self._reject(
                400,
                "codec",
                f"the offer cannot receive {codec} video (offered: {', '.join(sorted(offered))})",
            )
        sdp, _ = strip_mdns_candidates(req.sdp)
        self._pending.add(sid)
        pc = RTCPeerConnection(self._rtc_configuration())
        network: ImpairedIce | None = None
        try:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            media = params.impairment.media
            if not media.is_clear:  # both ways: the RTP sent, the client's RTCP received
                ice = transceiver.sender.transport.transport
                network = ImpairedIce(ice, media, media, seed=params.seed)
            force_codec(transceiver, codec, offer=sdp)  # must precede setRemoteDescription
            track.attach_sender(transceiver.sender)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            # Between the two: the answer must list the extension (carom_simulator.playout).
            writer = playout.install(transceiver, sdp, playout_delay(latency))
            if writer is None and latency != "smooth":
                raise ValueError("its playout-delay extension has an id another extension uses")
            answer = await pc.createAnswer()
            playout.check_answer(answer.sdp, writer)
            await pc.setLocalDescription(answer)
        except CodecUnavailable as exc:
            await self._discard(pc, track)
            raise self._reject(400, "codec", str(exc)) from None
        except playout.PlayoutUnsupported as exc:  # our fault, not the client's: say so loudly
            await self._discard(pc, track)
            log.error("cannot answer the playout-delay extension: %s", exc)
            raise self._reject(500, "playout", str(exc)) from None
        except Exception as exc:  # aiortc raises plain Exceptions (OperationError, ...) on bad SDP
            await self._discard(pc, track)
            detail = str(exc) or type(exc).__name__
            raise self._reject(400, "sdp", f"invalid SDP offer: {detail}") from None
        except BaseException:  # cancelled: free everything, then let it propagate
            await self._discard(pc, track)
            raise
        finally:
            self._pending.discard(sid)
            deleted = sid in self._doomed
            self._doomed.discard(sid)
        if deleted:  # DELETE came while the answer was being made: nobody will use it
            await self._discard(pc, track)
            raise self._reject(410, "deleted", f"session {sid!r} was deleted before its answer")
        session = Session(sid, pc, track, params, writer, network=network)
        if network is not None:
            self.counters["impaired"] += 1
        self._sessions[sid] = session
        self.counters["created"] += 1

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState == "connected":
                self.counters["connected"] += 1
                took_ms = (time.time_ns() - session.created_ns) / 1e6
                log.info("session %s connected %.0f ms after its answer", sid, took_ms)
                if session.watchdog is not None:
                    session.watchdog.cancel()  # its job is done; nothing to wait for
            elif pc.connectionState in ("failed", "closed"):
                await self.close(sid, reason=f"peer {pc.connectionState}")

        session.watchdog = asyncio.create_task(self._connect_watchdog(sid))
        local = pc.localDescription
        return Answer(session_id=sid, sdp=local.sdp, codec=codec, params=params, warning=warning)

    def _truth_for(self, sid: str) -> TruthCallback:
        sink = self._on_truth

        def emit(stamped: Stamped) -> None:
            sink(sid, stamped)

        return emit

    async def control(self, sid: str, change: SessionControl) -> SessionState:
        """Stop, resume or change session ``sid`` live; the state in force afterwards.

        Raises ``SessionError`` 404 for no such session, 422 for values that make no session
        (named: e.g. a radius too large for the new size), 409 for a latency other than smooth
        on a session whose browser did not offer the playout-delay extension, 429 past the phase
        limit. A latency change is written on the sender's packets from the next one on.
        """
        session = self._sessions.get(sid)
        if session is None:
            raise self._reject(404, "control_unknown", f"no session {sid!r}")
        if change.latency not in (None, "smooth") and session.delay_writer is None:
            raise self._reject(
                409,
                "control_playout",
                f"session {sid!r}: its browser did not offer the playout-delay RTP header "
                "extension, so its latency stays smooth",
            )
        fields = {
            k: v
            for k, v in msgspec.structs.asdict(change).items()
            if v is not None and k != "state"
        }
        params = msgspec.structs.replace(session.params, **fields) if fields else session.params
        spec = None
        if fields:
            try:
                spec = spec_of(params)
            except ValueError as exc:
                raise self._reject(
                    422, "control_params", f"invalid session parameters: {exc}"
                ) from None
            warning = session.track.spec.warning
            if (
                change.background is not None
                or change.width is not None
                or change.height is not None
            ):
                warning = await self._background_warning(params)
            spec = replace(spec, velocity=(change.vx, change.vy), warning=warning)
        streaming = None if change.state is None else change.state == "streaming"
        try:
            phase = session.track.control(spec, streaming)
        except ValueError as exc:
            raise self._reject(429, "control_phases", str(exc)) from None
        except RuntimeError as exc:
            raise self._reject(404, "control_unknown", f"session {sid!r}: {exc}") from None
        if change.latency is not None and session.delay_writer is not None:
            session.delay_writer.switch(playout_delay(change.latency))
        if change.network is not None:
            self._renetwork(session, params)
        session.params = params
        self.counters["controlled"] += 1
        state: StreamState = "streaming" if session.track.streaming else "stopped"
        return SessionState(
            session_id=sid, state=state, phase=phase, params=params,
            warning=session.track.spec.warning,
        )  # fmt: skip

    def _renetwork(self, session: Session, params: SessionParams) -> None:
        """Apply ``params``' media path to a running session from its next packet on."""
        media = params.impairment.media
        if session.network is not None:
            session.network.retarget(media, media)
        elif not media.is_clear:  # a session that started clear: its ICE transport, hooked now
            ice = session.pc.getTransceivers()[0].sender.transport.transport
            session.network = ImpairedIce(ice, media, media, seed=params.seed)
            self.counters["impaired"] += 1
        self.counters["network_changes"] += 1

    async def _background_warning(self, params: SessionParams) -> str:
        """The background's warning for the session's size (``background.check_background``).

        Resolving may generate a built-in clip and measuring decodes one loop of it, so both run
        on the frame executor; the answer is kept per (name, size). SessionError 422 names an
        unknown background or a file that is not a video.
        """
        assert params.background is not None and params.width and params.height
        key = (params.background, params.width, params.height)
        if params.background == PLAIN:
            return ""
        if key in self._warnings:
            return self._warnings[key]
        cfg = self._settings.backgrounds
        directory = Path(cfg.directory).expanduser() if cfg.directory else None
        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None

        def measure() -> str:
            path = resolve_background(key[0], directory, cache_dir=cache)
            assert path is not None
            return check_background(measure_interference(path, key[1], key[2]).worst) or ""

        loop = asyncio.get_running_loop()
        try:
            warning = await loop.run_in_executor(self._executor, measure)
        except (ValueError, OSError, av.FFmpegError) as exc:
            raise self._reject(422, "background", f"background {key[0]!r}: {exc}") from None
        if len(self._warnings) >= _MAX_WARNINGS:
            self._warnings.clear()
        self._warnings[key] = warning
        if warning:
            log.warning("background %s at %dx%d: %s", *key, warning)
        return warning

    def _rtc_configuration(self) -> RTCConfiguration:
        stun = self._settings.ice.stun_server
        return RTCConfiguration(iceServers=[RTCIceServer(f"stun:{stun}")] if stun else [])

    async def _connect_watchdog(self, sid: str) -> None:
        await asyncio.sleep(self._settings.connect_timeout_s)
        session = self._sessions.get(sid)
        if session is not None and session.pc.connectionState != "connected":
            self.counters["connect_timeouts"] += 1
            await self.close(sid, reason="connect timeout", from_watchdog=True)

    @staticmethod
    async def _discard(
        pc: RTCPeerConnection,
        track: BallTrack,
        linger_s: float = 0.0,
        network: ImpairedIce | None = None,
    ) -> None:
        """Stop the track, let a frame already handed to the encoder go out, close the peer.

        ``linger_s``: closing the peer connection at once cancelled the sender while it was still
        encoding the last frame, so that frame, due and with its truth published, never left
        (seen in bench/floor.py: Chromium received 1,202 of 1,203 frames, the last one missed).
        """
        track.stop()
        if linger_s > 0:
            await asyncio.sleep(linger_s)
        if network is not None:  # frames still on the emulated wire arrive, as on a real one
            await network.drain(DRAIN_EMULATED_S)
        await pc.close()

    async def close(self, sid: str, reason: str = "closed", from_watchdog: bool = False) -> bool:
        """End a session and free everything it holds; False if there was no such session.

        A session whose offer is still being answered is marked, and ``create`` throws its
        answer away: else it would hold its slot until the connect timeout (the router's DELETE
        after it gave up on an offer came before the offer's session existed, issue 14).
        """
        session = self._sessions.pop(sid, None)
        if session is None:
            if sid in self._pending and sid not in self._doomed:
                self._doomed.add(sid)
                self.counters["deleted_pending"] += 1
                return True
            return False
        self.counters["closed"] += 1
        if session.watchdog is not None and not from_watchdog:
            session.watchdog.cancel()
        self.finished_stats.update(
            {k: int(v) for k, v in session.track.stats().items() if isinstance(v, int | float)}
        )
        # Two frame intervals (capped): the last frame's encode and send take ~1-3 ms here.
        fps = session.params.fps or 30.0  # resolved at create: never None here
        await self._discard(session.pc, session.track, min(0.1, 2.0 / fps), session.network)
        if session.network is not None:
            sent, received = session.network.counts()
            session.network.close()
            log.info("session %s's emulated media path: sent %s, received %s", sid, sent, received)
        if self._on_end is not None:  # after the track stopped: no truth can follow it
            track = session.track
            self._on_end(sid, track.frames_due, time.time_ns(), reason, track.phases())
        log.info("session %s ended: %s", sid, reason)
        return True

    async def close_all(self) -> None:
        self._doomed.update(self._pending)  # offers still being answered end with the rest
        await asyncio.gather(*(self.close(sid, "shutdown") for sid in list(self._sessions)))

    def info(self) -> list[SessionInfo]:
        return [
            SessionInfo(
                session_id=s.session_id,
                state=s.pc.connectionState,
                created_ns=s.created_ns,
                params=s.params,
                stats=s.track.stats(),
            )
            for s in self._sessions.values()
        ]

    def totals(self) -> Counter[str]:
        """Track counters summed over live and finished sessions (for /metrics)."""
        total = Counter(self.finished_stats)
        for s in self._sessions.values():
            total.update(
                {k: int(v) for k, v in s.track.stats().items() if isinstance(v, int | float)}
            )
        return total
