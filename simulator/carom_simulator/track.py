"""The ball's WebRTC video track: paced frames, generated off the loop, with exact frame identity.

Pacing. Frame ``n`` is due at ``start + n / fps`` on the monotonic clock (``start`` = the first
``recv()``) and carries ``pts = round(n * 90000 / fps)`` in ``time_base = 1/90000``. ``recv()``
sleeps until the frame is due: aiortc pulls frames as fast as ``recv()`` returns them, so an
unpaced track makes the encoder run flat out. A ``recv()`` that comes more than one frame interval
late skips the frames whose time has passed (``frames_late_dropped``) instead of queueing them, so
what is sent is always the ball's position *now*, and pts stays on the real timeline. Within
the first ``startup_grace_s`` of frames (the service passes 0.5 s) a late ``recv()`` shifts the
timeline instead (frame n is then due ``now``): aiortc's first frames are slow for reasons of its
own (encoder set-up, keyframes, the connection's first packets; measured 15-35 ms late for
frames 1-3 at 60 fps), and skipping them cost 1-2 of every 1,200 frames at 60 fps.

Generation. Physics step + render + ``VideoFrame`` construction run on an executor the service
owns, never on the event loop and never on the loop's default executor (aiortc encodes there).
One job at a time per track (``Ball`` is not thread-safe) fills a small buffer of frames ahead of
their due time; a frame not ready when due is counted in ``generation_late``.

Capture time. ``t_render_ns`` is ``clock()`` when ``recv()`` hands the frame to aiortc's encoder:
the frame's capture time, the first hop of every latency Carom measures.

Frame identity (aiortc 1.16.0, read in ``aiortc/rtcrtpsender.py``). ``RTCRtpSender._run_rtp``
draws ``timestamp_origin = random32()`` as a local and stamps every packet of a frame with
``uint32_add(timestamp_origin, enc_frame.timestamp)``, where ``enc_frame.timestamp`` is
``convert_timebase(frame.pts, frame.time_base, 1/90000)`` of the frame it got from ``recv()``
(the identity for our time base; the H.264 encoder returns the *input* frame's pts and, tuned
``zerolatency``, emits every frame at once). So the RTP timestamp the browser sees is
``(origin + pts) mod 2**32``; aiortc's receiver (``TimestampMapper``) does NOT give it back as
pts, it subtracts the first frame's timestamp. The origin is never exposed, so it is learned:
``_run_rtp`` is a loop ``recv() -> encode -> send every packet -> recv()``, and after each packet
it sets ``self.__rtp_timestamp = packet.timestamp`` and ``self.__packet_count += 1``. Hence on
entry to ``recv()``, if the sender's packet count moved since the previous ``recv()`` returned,
those packets were the previous frame's and ``origin = (rtp_timestamp - previous pts) mod 2**32``.
If the count did not move (sender disabled, encoder gave no payload), nothing is inferred
(``frames_unsent``), so a skipped frame cannot corrupt the origin. An origin is trusted only once
``origin_confirmations`` (default 2) consecutive observations agree; every later observation is
checked (``origin_agreements`` / ``origin_mismatches``), and a different origin confirmed the
same way replaces it (``origin_changes``, logged). Retransmissions touch neither attribute. That
inference and the truth waiting for it are ``carom_simulator.origin.OriginLearner``, pure and
unit-tested (tests/simulator/test_origin.py); this module only reads the sender's attributes.
``attach_sender`` fails loudly if the two private attributes are gone, and the loopback test
(tests/simulator/test_track.py) joins every decoded frame to its truth by RTP timestamp, so an
aiortc upgrade that changes any of this fails a test instead of silently mislabelling frames.
(Rejected alternatives: patching ``aiortc.rtcrtpsender.random32`` is process-wide and cannot tell
which sender a draw is for; reading ``timestamp_origin`` out of the ``_run_rtp`` coroutine's
frame locals depends on a local variable's name, which is even less stable than attributes.)

Truth. ``on_truth(stamped)`` (a ``carom_simulator.origin.Stamped``: the frame's record and its
RTP timestamp) is called on the loop thread for every frame handed to the encoder, in frame order
(``frame`` counts from 0 on the real timeline, so it skips the numbers of dropped frames).
Frames sent before the origin is known (the first ``origin_confirmations`` frames) wait in a
bounded backlog and are emitted as soon as it is;
overflow is counted (``truth_overflow``), and whatever is still waiting at ``stop()`` is counted
as ``truth_abandoned``.

Frames due but never sent. A frame skipped as late is still a frame due: ``on_truth`` gets its
record too (``sent`` False, ``t_render_ns`` = when it was due), through the same ordered backlog
as truth (it needs the origin for its ``rtp_ts`` too), so the tracker gives it its one row
(``not_sent``) and coverage is counted over every frame of the session's life, not only the ones
that made it out. ``frames_due`` is how many frame indexes the track has handed out or skipped.

Live control (issue 17). ``control(spec, streaming)`` changes the session while it runs; each
change starts a *phase* (``Spec.phase``), and every frame's record says which phase made it.

- A new spec (frame rate, size, bitrate, keyframe interval, physics, background) takes effect at
  the next frame handed out: frames made ahead with the old one are dropped (``frames_discarded``)
  and the ball goes on from the frame last handed out (``physics.Ball.changed``). A new rate
  rebases the timeline at that frame (``Timeline.rebase``); a new size or bitrate re-creates
  aiortc's encoder, so it gets the start-up grace.
- Stop: no frame is made or due while stopped. The next ``recv()`` releases aiortc's encoder
  (``RTCRtpSender.__encoder``, re-created by aiortc on the next frame, which is then a keyframe)
  and waits; the generation job in flight finishes and is dropped and the background decoder is
  closed, so a stopped session holds no codec, no frame work and no paced wait. The sender's RTP
  loop stays parked in ``recv()`` and RTCP and ICE go on, so the peer connection lives and resume
  needs no new offer. Resume rebases the timeline at the next frame index, due now: indexes run
  on without a gap, pts jump by the time stopped (``Timeline``).
- Target bitrate: aiortc clamps ``target_bitrate`` to 0.5-3 Mbps (H.264) and lets the browser's
  REMB set it; a session's own target (``Spec.bitrate`` > 0) is pinned on the encoder just before
  each frame is encoded (nothing awaits between ``recv()`` returning and the encode), so it holds
  whatever REMB said and wherever aiortc's clamp is: ``carom_simulator.encoder``'s
  ``pinned_bitrate``, or aiortc's own encoder's private target field.
- Keyframe interval: every ``keyframe_interval``-th frame of a phase is requested as a keyframe
  (``RTCRtpSender._send_keyframe``, the PLI handler's own call).
- Bytes sent per phase: the sender's octet counter, read on entry to ``recv()`` (every packet of
  the frames handed so far has gone by then), is charged to the phase of the last frame handed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Final, Protocol

import av
import numpy as np
import numpy.typing as npt
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from carom.schemas import PhaseSummary
from carom_simulator.feedback import NONE, feedback
from carom_simulator.origin import OriginLearner, PendingTruth, Stamped
from carom_simulator.physics import Ball, PhysicsParams
from carom_simulator.render import Renderer
from carom_simulator.timeline import RTP_CLOCK_RATE, Timeline

__all__ = [
    "RTP_CLOCK_RATE", "BackgroundOpener", "BackgroundSource", "BallTrack", "Spec", "TruthCallback",
]  # fmt: skip

log = logging.getLogger("carom.simulator.track")

#: pts are in RTP clock ticks (90 kHz for every video codec Carom uses).
_TIME_BASE: Final = Fraction(1, RTP_CLOCK_RATE)
#: Private attributes of aiortc 1.16's RTCRtpSender that ``_run_rtp`` sets after each packet.
_SENDER_RTP_TS: Final = "_RTCRtpSender__rtp_timestamp"
_SENDER_PACKETS: Final = "_RTCRtpSender__packet_count"
_SENDER_ENCODER: Final = "_RTCRtpSender__encoder"
_SENDER_OCTETS: Final = "_RTCRtpSender__octet_count"
#: The record of every frame due (sent or skipped), in frame order, on the event loop thread.
TruthCallback = Callable[[Stamped], None]
#: Most phases one session may have (a client changing parameters forever must not grow the
#: simulator's memory: ``control`` refuses more).
MAX_PHASES: Final = 10_000


class BackgroundSource(Protocol):
    """What the ball is drawn over, frame by frame (``carom_simulator.background``).

    Used by one generation job at a time, on an executor thread.
    """

    def frame(self, index: int, fps: float, width: int, height: int) -> npt.NDArray[np.uint8]:
        """The packed I420 background of frame ``index`` of a stream at ``fps``."""
        ...

    def close(self) -> None: ...


#: Opens the named background (None for ``plain``); runs on an executor thread.
BackgroundOpener = Callable[[str], BackgroundSource | None]


@dataclass(frozen=True, slots=True)
class Spec:
    """What a phase's frames are made with: the parameters in force, and the phase's number."""

    physics: PhysicsParams
    phase: int = 0
    #: Target bits/s written into the encoder; 0: the encoder's own (aiortc + REMB).
    bitrate: int = 0
    #: A keyframe every this many frames of the phase; 0: only when the browser asks.
    keyframe_interval: int = 0
    background: str = "plain"
    #: Components of the velocity this phase sets (None: the ball keeps its own).
    velocity: tuple[float | None, float | None] = (None, None)
    #: Why this phase's L2 figures may be wrong (``background.check_background``); or empty.
    warning: str = ""
    #: The playout mode in force (``carom.schemas.Latency``): every frame of the phase is
    #: labelled with it. The sender's playout-delay writer is set by the session, not here.
    latency: str = "smooth"
    #: The emulated network's profile name (``carom.impairment``): the session applies it.
    network: str = "clear"


@dataclass(slots=True)
class _Phase:
    """A phase's log, for the session's ``PhaseSummary`` records."""

    spec: Spec
    streaming: bool
    first_frame: int
    t_start_ns: int
    t_end_ns: int | None = None
    frames_sent: int = 0
    bytes_sent: int = 0
    nacks: int = 0
    retransmitted: int = 0
    keyframe_requests: int = 0


class _Gen:
    """One phase's frame maker: touched only by the one generation job in flight."""

    def __init__(self, spec: Spec, ball: Ball, source: BackgroundSource | None) -> None:
        p = spec.physics
        self.spec = spec
        self.ball = ball
        self.renderer = Renderer(p.width, p.height, p.radius)
        self.source = source
        "The open background (None before the first frame needs it, or for plain)."


def _video_frame(i420: Any, width: int, height: int) -> av.VideoFrame:
    """Copy a packed I420 array into a new VideoFrame's planes (4x faster than from_ndarray)."""
    video = av.VideoFrame(width, height, "yuv420p")
    flat = i420.reshape(-1)
    offset = 0
    for plane, (w, h) in zip(
        video.planes,
        ((width, height), (width // 2, height // 2), (width // 2, height // 2)),
        strict=True,
    ):
        buf: Any = plane  # a VideoPlane exposes the buffer protocol; numpy's stubs do not know
        dst = np.frombuffer(buf, np.uint8).reshape(plane.height, plane.line_size)[:, :w]
        dst[...] = flat[offset : offset + w * h].reshape(h, w)
        offset += w * h
    return video


@dataclass(frozen=True, slots=True)
class _Frame:
    index: int
    x: float
    y: float
    pts: int
    video: av.VideoFrame
    spec: Spec
    ball: Ball
    "The ball's state at this frame (a live change goes on from the frame handed out last)."
    source: BackgroundSource | None
    "The background the job opened or used (it passes to the next job of the phase)."


class BallTrack(MediaStreamTrack):
    """One session's bouncing-ball video; see the module docstring for pacing and identity."""

    kind = "video"

    def __init__(
        self,
        session_id: str,
        spec: Spec | PhysicsParams,
        on_truth: TruthCallback,
        *,
        executor: Executor,
        backgrounds: BackgroundOpener | None = None,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        buffer_size: int = 3,
        truth_backlog: int = 120,
        origin_confirmations: int = 2,
        startup_grace_s: float = 0.0,
    ) -> None:
        super().__init__()
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if isinstance(spec, PhysicsParams):
            spec = Spec(spec)
        self._identity = OriginLearner(origin_confirmations, truth_backlog)  # checks both
        self.session_id: Final = session_id
        self._on_truth = on_truth
        self._executor = executor
        self._backgrounds = backgrounds
        self._clock = clock
        self._monotonic = monotonic
        self._grace_s = startup_grace_s
        self._timeline = Timeline(spec.physics.fps, startup_grace_s)
        self._buffer_size = buffer_size
        self._spec = spec
        self._gen = _Gen(spec, Ball(spec.physics), None)
        self._last: _Frame | None = None
        "The frame handed out last (its ball is where a live change goes on from)."
        self._phases = [_Phase(spec, True, 0, clock())]
        self._streaming = True
        self._resume: asyncio.Future[None] | None = None
        self._encoder_released = 0
        self._to_close: list[BackgroundSource] = []

        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._error: BaseException | None = None
        self._gen_next = 0  # index the next generation job produces
        self._ready: deque[_Frame] = deque()
        self._inflight: Future[_Frame] | None = None
        self._waiter: asyncio.Future[None] | None = None

        self._sender: Any = None
        self._octets_seen = 0

        self._generation_late = 0
        self._frames_generated = 0
        self._frames_discarded = 0
        self._truth_emitted = 0
        self._not_sent_emitted = 0
        self._truth_errors = 0

        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass  # not on a loop yet: generation starts with the first recv()
        else:
            self._pump()

    # ----------------------------------------------------------------------------- public API

    def attach_sender(self, sender: Any) -> None:
        """Give the track the ``RTCRtpSender`` sending it, so it can learn the RTP origin.

        Call it right after ``addTransceiver``/``addTrack``. Raises ``RuntimeError`` if the
        sender lacks the private attributes this relies on (i.e. aiortc is not 1.16-compatible).
        """
        wanted = (_SENDER_RTP_TS, _SENDER_PACKETS, _SENDER_ENCODER, _SENDER_OCTETS)
        missing = [a for a in wanted if not hasattr(sender, a)]
        for method in ("_send_keyframe", "_handle_rtcp_packet"):
            if not callable(getattr(sender, method, None)):
                missing.append(f"{method}()")
        if missing:
            raise RuntimeError(
                f"this aiortc's RTCRtpSender has no {', '.join(missing)}: BallTrack cannot learn "
                "the RTP timestamp origin nor control the encoder (written for aiortc 1.16.0)"
            )
        if getattr(sender, "track", self) is not self:
            raise ValueError("the sender is not sending this track")
        self._sender = sender
        self._octets_seen = getattr(sender, _SENDER_OCTETS)
        handle = sender._handle_rtcp_packet  # aiortc's DTLS transport looks it up per packet

        async def counted(packet: Any) -> None:
            asks = feedback(packet)
            if asks is not NONE:
                phase = self._phases[-1]
                phase.nacks += asks.nacks
                phase.retransmitted += asks.asked
                phase.keyframe_requests += asks.keyframe_requests
            await handle(packet)

        sender._handle_rtcp_packet = counted

    @property
    def params(self) -> PhysicsParams:
        """The physics and video parameters in force."""
        return self._spec.physics

    @property
    def spec(self) -> Spec:
        """What frames are made with now (the phase in force)."""
        return self._spec

    @property
    def streaming(self) -> bool:
        """False while the stream is stopped (``control``)."""
        return self._streaming

    @property
    def phase(self) -> int:
        """The phase in force: the last one started."""
        return len(self._phases) - 1

    @property
    def rtp_origin(self) -> int | None:
        """The sender's RTP timestamp origin once confirmed (RTP ts = (origin + pts) mod 2**32)."""
        return self._identity.origin

    @property
    def frames_due(self) -> int:
        """Frame indexes handed to the encoder or skipped so far: frames ``0 .. frames_due-1``."""
        return self._timeline.next

    def pts_of(self, frame: int) -> int:
        """The 90 kHz pts of frame ``frame`` (of the timeline's current segment)."""
        return self._timeline.pts_of(frame)

    def control(self, spec: Spec | None = None, streaming: bool | None = None) -> int:
        """Change the session live: ``spec`` from the next frame, ``streaming`` stop/resume.

        Returns the phase in force afterwards. A spec given while stopped waits for the resume
        (its phase starts then); stopping a stopped stream or resuming a streaming one changes
        nothing. ``spec.phase`` is ignored: phases are numbered here. Raises ``ValueError``
        past :data:`MAX_PHASES` and ``RuntimeError`` once the track has ended.
        """
        if self._stopped:
            raise RuntimeError("the track has ended")
        starts = int(spec is not None and self._streaming and streaming is not False)
        starts += int(streaming is not None and streaming != self._streaming)
        if len(self._phases) + starts > MAX_PHASES:
            raise ValueError(f"a session may have at most {MAX_PHASES} phases")
        if spec is not None:
            self._change(spec)
        if streaming is False and self._streaming:
            self._pause()
        elif streaming is True and not self._streaming:
            self._unpause()
        return self.phase

    def phases(self) -> list[PhaseSummary]:
        """The session's phases so far, in order, with what each sent (for ``SessionEnd``)."""
        self._charge_octets()
        out: list[PhaseSummary] = []
        now_ns = self._clock()
        for i, ph in enumerate(self._phases):
            last = i == len(self._phases) - 1
            end_frame = self._timeline.next if last else self._phases[i + 1].first_frame
            p = ph.spec.physics
            out.append(
                PhaseSummary(
                    phase=i,
                    state="streaming" if ph.streaming else "stopped",
                    first_frame=ph.first_frame,
                    frames_due=max(0, end_frame - ph.first_frame) if ph.streaming else 0,
                    frames_sent=ph.frames_sent,
                    t_start_ns=ph.t_start_ns,
                    t_end_ns=ph.t_end_ns if ph.t_end_ns is not None else now_ns,
                    fps=p.fps,
                    width=p.width,
                    height=p.height,
                    bitrate=ph.spec.bitrate,
                    keyframe_interval=ph.spec.keyframe_interval,
                    gravity=p.gravity,
                    vx=p.vx,
                    vy=p.vy,
                    cor=p.cor,
                    background=ph.spec.background,
                    bytes_sent=ph.bytes_sent,
                    warning=ph.spec.warning,
                    latency=ph.spec.latency,
                    network=ph.spec.network,
                    nacks=ph.nacks,
                    retransmitted=ph.retransmitted,
                    keyframe_requests=ph.keyframe_requests,
                )
            )
        return out

    def stats(self) -> dict[str, int | float | bool]:
        """Counters for this session's metrics; counts are cumulative since creation."""
        inflight, ident, timeline = self._inflight, self._identity, self._timeline
        return {
            "frames_sent": timeline.sent,
            "frames_late_dropped": timeline.late_dropped,
            "generation_late": self._generation_late,
            "frames_generated": self._frames_generated,
            "frames_discarded": self._frames_discarded,
            "frames_unsent": ident.unsent,
            "generation_pending": int(inflight is not None and not inflight.done()),
            "frames_buffered": len(self._ready),
            "truth_emitted": self._truth_emitted,
            "not_sent_emitted": self._not_sent_emitted,
            "truth_pending": ident.pending,
            "truth_overflow": ident.overflow,
            "truth_abandoned": ident.abandoned,
            "truth_errors": self._truth_errors,
            "origin_known": ident.origin is not None,
            "origin_observations": ident.observations,
            "origin_agreements": ident.agreements,
            "origin_mismatches": ident.mismatches,
            "origin_changes": ident.changes,
            "release_lag_ms_mean": timeline.lag_ms_mean,
            "release_lag_ms_max": timeline.lag_ms_max,
            "phase": self.phase,
            "rtcp_nacks": sum(ph.nacks for ph in self._phases),
            "rtcp_retransmit_asked": sum(ph.retransmitted for ph in self._phases),
            "rtcp_keyframe_requests": sum(ph.keyframe_requests for ph in self._phases),
            "streaming": self._streaming,
            "encoder_released": self._encoder_released,
            "background_open": int(self._gen.source is not None) + len(self._to_close),
        }

    def stop(self) -> None:
        """End the track: no more frames, generation cancelled, waiting truth counted as lost.

        Idempotent; aiortc also calls it when the sender stops. A generation job already
        running on the executor cannot be interrupted; it finishes within a frame's render time
        and its result is dropped (and its background closed).
        """
        if self._stopped:
            return
        self._stopped = True
        super().stop()
        self._end_phase()
        inflight = self._inflight
        if inflight is not None:
            inflight.cancel()
        self._ready.clear()
        self._retire(self._gen.source)
        self._gen.source = None
        self._flush_closes()
        self._identity.abandon()
        self._wake()
        resume = self._resume
        if resume is not None and not resume.done():
            resume.set_result(None)

    async def recv(self) -> av.VideoFrame:
        """The next due frame (an ``av.VideoFrame``), waiting until it is due."""
        if self._stopped:
            raise MediaStreamError
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._observe_sender()
        while True:
            if not self._streaming:
                await self._wait_resumed()
            now = self._monotonic()
            due = self._timeline.due(now)  # the schedule and what it skips: timeline.py
            if due.skipped:
                self._not_sent(due.skipped, now)
                self._skip_to(due.index)
            self._pump()

            delay = due.at - self._monotonic()
            if delay > 0.0:
                await asyncio.sleep(delay)
            if self._streaming:
                break  # else: stopped while it waited; this index was not handed, so not due
        frame = await self._take(due.index)

        t_render_ns = self._clock()
        self._timeline.handed(frame.index, due.at, self._monotonic())
        self._last = frame
        self._pump()

        phase = self._phases[frame.spec.phase]
        phase.frames_sent += 1
        sender = self._sender
        packets = None
        if sender is not None:
            packets = getattr(sender, _SENDER_PACKETS)
            self._drive_encoder(sender, frame.spec, phase.frames_sent)
        self._identity.handed(frame.pts, packets)
        p = frame.spec.physics
        self._truth(
            PendingTruth(
                frame.index,
                frame.pts,
                frame.x,
                frame.y,
                t_render_ns,
                phase=frame.spec.phase,
                width=p.width,
                height=p.height,
                latency=frame.spec.latency,
            )
        )
        return frame.video

    # ---------------------------------------------------------------------------- live control

    def _change(self, spec: Spec) -> None:
        """Make frames with ``spec`` from the next one on (see the module docstring)."""
        old = self._spec
        physics = spec.physics
        resized = (physics.width, physics.height) != (old.physics.width, old.physics.height)
        if self._streaming:
            spec = replace(spec, phase=len(self._phases))
            self._end_phase()
            self._phases.append(_Phase(spec, True, self._timeline.next, self._clock()))
            grace = self._grace_s if resized or spec.bitrate != old.bitrate else 0.0
            if physics.fps != old.physics.fps or grace:
                self._timeline.rebase(physics.fps, None, grace)
        else:  # starts with the resume
            spec = replace(spec, phase=old.phase)
        self._spec = spec
        source = self._gen.source if spec.background == old.background else None
        if source is None:
            self._retire(self._gen.source)
        self._gen = _Gen(spec, self._ball_from_last(spec), source)
        self._restart_generation()

    def _pause(self) -> None:
        self._streaming = False
        self._end_phase()
        self._phases.append(
            _Phase(replace(self._spec, phase=len(self._phases)), False, self._timeline.next,
                   self._clock())
        )  # fmt: skip
        # The decoder is freed while stopped. A fresh maker: a job in flight may still open a
        # background on the old one, and its frame then brings it back to be closed.
        self._retire(self._gen.source)
        self._gen = _Gen(self._spec, self._gen.ball, None)
        self._restart_generation()

    def _unpause(self) -> None:
        spec = replace(self._spec, phase=len(self._phases))
        self._end_phase()
        self._phases.append(_Phase(spec, True, self._timeline.next, self._clock()))
        self._spec = spec
        self._gen = _Gen(spec, self._ball_from_last(spec), None)
        self._timeline.rebase(spec.physics.fps, self._monotonic(), self._grace_s)
        self._streaming = True
        self._restart_generation()
        resume = self._resume
        if resume is not None and not resume.done():
            resume.set_result(None)

    def _ball_from_last(self, spec: Spec) -> Ball:
        last = self._last
        if last is None:
            return Ball(spec.physics)
        return last.ball.changed(spec.physics, spec.velocity)

    def _restart_generation(self) -> None:
        """Forget frames made ahead; a job in flight finishes and its frame is dropped."""
        self._frames_discarded += len(self._ready)
        self._ready.clear()
        self._gen_next = self._timeline.next
        self._flush_closes()
        self._pump()

    def _end_phase(self) -> None:
        self._charge_octets()
        current = self._phases[-1]
        if current.t_end_ns is None:
            current.t_end_ns = self._clock()

    async def _wait_resumed(self) -> None:
        """Park ``recv()`` while stopped, with aiortc's encoder released."""
        sender = self._sender
        if sender is not None and getattr(sender, _SENDER_ENCODER) is not None:
            # No encode runs while aiortc awaits recv(): the previous frame's has returned.
            setattr(sender, _SENDER_ENCODER, None)
            self._encoder_released += 1
        assert self._loop is not None
        while not self._streaming:
            if self._stopped:
                raise MediaStreamError
            resume = self._resume = self._loop.create_future()
            try:
                await resume
            finally:
                self._resume = None
        if self._stopped:
            raise MediaStreamError

    def _drive_encoder(self, sender: Any, spec: Spec, nth: int) -> None:
        """The phase's bitrate and keyframes, set just before aiortc encodes the frame."""
        if spec.keyframe_interval and (nth - 1) % spec.keyframe_interval == 0:
            sender._send_keyframe()
        encoder = getattr(sender, _SENDER_ENCODER)
        if encoder is None:
            return
        if hasattr(encoder, "pinned_bitrate"):  # carom_simulator.encoder's: 0 unpins
            encoder.pinned_bitrate = spec.bitrate or None
            encoder.fps = spec.physics.fps
        elif spec.bitrate:
            # aiortc's own encoder: its private target, past the clamp and REMB (the name is
            # mangled with the class that defines it, so look along the MRO).
            for cls in type(encoder).__mro__:
                name = f"_{cls.__name__}__target_bitrate"
                if hasattr(encoder, name):
                    setattr(encoder, name, spec.bitrate)
                    break

    def _charge_octets(self) -> None:
        """Charge what the sender sent since the last look to the phase of the last frame."""
        sender, last = self._sender, self._last
        if sender is None:
            return
        octets = getattr(sender, _SENDER_OCTETS)
        if last is not None:
            self._phases[last.spec.phase].bytes_sent += octets - self._octets_seen
        self._octets_seen = octets

    # ------------------------------------------------------------------------------ generation

    @staticmethod
    def _generate(gen: _Gen, index: int, pts: int, opener: BackgroundOpener | None) -> _Frame:
        """Runs on the executor: advance the ball to frame ``index`` and render it."""
        ball, spec = gen.ball, gen.spec
        p = spec.physics
        while ball.frame < index:
            ball.step()
        x, y = ball.position
        background = None
        if spec.background != "plain":
            if gen.source is None:
                if opener is None:
                    raise RuntimeError(f"no background source for {spec.background!r}")
                gen.source = opener(spec.background)
            if gen.source is not None:
                background = gen.source.frame(index, p.fps, p.width, p.height)
        render = gen.renderer.render_i420
        i420 = render(x, y) if background is None else render(x, y, background)
        video = _video_frame(i420, p.width, p.height)
        video.pts = pts
        video.time_base = _TIME_BASE
        return _Frame(index, x, y, pts, video, spec, ball.snapshot(), gen.source)

    def _pump(self) -> None:
        """Start the next generation job if the buffer has room and none is running."""
        if self._stopped or self._error is not None or self._inflight is not None:
            return
        if not self._streaming or len(self._ready) >= self._buffer_size:
            return
        index = self._gen_next
        try:
            fut = self._executor.submit(
                self._generate, self._gen, index, self.pts_of(index), self._backgrounds
            )
        except RuntimeError as exc:  # executor shut down under us
            self._fail(exc)
            return
        self._inflight = fut
        fut.add_done_callback(self._done_threadsafe)

    def _done_threadsafe(self, fut: Future[_Frame]) -> None:
        # Runs on the executor thread (or wherever cancel() was called).
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._on_generated, fut)
        except RuntimeError:
            pass  # loop closed: nobody is left to hand the frame to

    def _on_generated(self, fut: Future[_Frame]) -> None:
        if fut is not self._inflight:
            return
        self._inflight = None
        if fut.cancelled():
            self._flush_closes()
            return
        exc = fut.exception()
        if exc is not None:
            self._flush_closes()
            if not self._stopped:
                self._fail(exc)
            return
        frame = fut.result()
        if frame.source is not None and frame.source is not self._gen.source:
            if self._gen.spec is frame.spec and not self._stopped and self._streaming:
                self._gen.source = frame.source  # the job opened the phase's background
            else:
                self._retire(frame.source)  # opened for a phase that ended meanwhile
        self._flush_closes()
        if self._stopped:
            return
        self._frames_generated += 1
        if frame.spec is not self._spec or not self._streaming:
            self._frames_discarded += 1  # made for a phase that has ended
        else:
            self._gen_next = max(self._gen_next, frame.index + 1)
            if frame.index < self._timeline.next:
                self._frames_discarded += 1
            else:
                self._ready.append(frame)
                self._wake()
        self._pump()

    def _retire(self, source: BackgroundSource | None) -> None:
        """Close ``source`` once no job can be using it (on the executor: it may block)."""
        if source is not None and source not in self._to_close:
            self._to_close.append(source)

    def _flush_closes(self) -> None:
        if self._inflight is not None or not self._to_close:
            return
        sources, self._to_close = self._to_close, []
        for source in sources:
            try:
                self._executor.submit(source.close)
            except RuntimeError:  # executor shut down: close here rather than leak it
                source.close()

    def _skip_to(self, index: int) -> None:
        """Forget buffered frames before ``index`` and make generation jump to it."""
        while self._ready and self._ready[0].index < index:
            self._ready.popleft()
            self._frames_discarded += 1
        self._gen_next = max(self._gen_next, index)

    async def _take(self, index: int) -> _Frame:
        """Frame ``index`` from the buffer, waiting for generation if it is behind."""
        counted = False
        while True:
            if self._stopped:
                raise MediaStreamError
            if self._error is not None:
                raise MediaStreamError(f"frame generation failed: {self._error!r}")
            self._skip_to(index)
            if self._ready:
                return self._ready.popleft()
            if not counted:
                self._generation_late += 1
                counted = True
            self._pump()
            assert self._loop is not None
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            log.error("session %s: frame generation failed", self.session_id, exc_info=exc)
        self._error = exc
        self._wake()

    # ---------------------------------------------------------------------- identity and truth

    def _observe_sender(self) -> None:
        """Hand the sender's packet count and last RTP timestamp to the origin learner."""
        sender = self._sender
        if sender is None:
            return
        self._charge_octets()
        ident = self._identity
        before = ident.origin
        released = ident.observe(getattr(sender, _SENDER_PACKETS), getattr(sender, _SENDER_RTP_TS))
        if before is not None and ident.origin != before:
            log.warning(
                "session %s: RTP timestamp origin changed from %d to %d",
                self.session_id,
                before,
                ident.origin,
            )
        for stamped in released:
            self._emit(stamped)

    def _not_sent(self, skipped: range, now: float) -> None:
        """The ``skipped`` frames were due and are not sent: each still gets its record."""
        wall, timeline, spec = self._clock(), self._timeline, self._spec
        for index in skipped:
            t_due = wall - round((now - timeline.due_at(index)) * 1e9)
            self._truth(
                PendingTruth(
                    index,
                    self.pts_of(index),
                    0.0,
                    0.0,
                    t_due,
                    sent=False,
                    phase=spec.phase,
                    latency=spec.latency,
                )
            )

    def _truth(self, pending: PendingTruth) -> None:
        for stamped in self._identity.add(pending):
            self._emit(stamped)

    def _emit(self, stamped: Stamped) -> None:
        try:
            self._on_truth(stamped)
        except Exception:
            if not self._truth_errors:
                log.exception("session %s: truth callback failed", self.session_id)
            self._truth_errors += 1
        else:
            if stamped.truth.sent:
                self._truth_emitted += 1
            else:
                self._not_sent_emitted += 1
