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

Truth. ``on_truth(frame, rtp_ts, x, y, t_render_ns)`` is called on the loop thread for every
frame handed to the encoder, in frame order (``frame`` counts from 0 on the real timeline, so it
skips the numbers of dropped frames). Frames sent before the origin is known (the first
``origin_confirmations`` frames) wait in a bounded backlog and are emitted as soon as it is;
overflow is counted (``truth_overflow``), and whatever is still waiting at ``stop()`` is counted
as ``truth_abandoned``.

Frames due but never sent. A frame skipped as late is still a frame due: ``on_not_sent(frame,
rtp_ts, t_due_ns)`` is called for it, through the same ordered backlog as truth (it needs the
origin for its ``rtp_ts`` too), so the tracker gives it its one row (``not_sent``) and coverage is
counted over every frame of the session's life, not only the ones that made it out.
``frames_due`` is how many frame indexes the track has handed out or skipped so far.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from carom_simulator.origin import OriginLearner, PendingTruth, Stamped
from carom_simulator.physics import Ball, PhysicsParams
from carom_simulator.render import Renderer
from carom_simulator.timeline import RTP_CLOCK_RATE, Timeline

__all__ = ["RTP_CLOCK_RATE", "BallTrack", "NotSentCallback", "TruthCallback"]

log = logging.getLogger("carom.simulator.track")

#: pts are in RTP clock ticks (90 kHz for every video codec Carom uses).
_TIME_BASE: Final = Fraction(1, RTP_CLOCK_RATE)
#: Private attributes of aiortc 1.16's RTCRtpSender that ``_run_rtp`` sets after each packet.
_SENDER_RTP_TS: Final = "_RTCRtpSender__rtp_timestamp"
_SENDER_PACKETS: Final = "_RTCRtpSender__packet_count"
#: ``(frame, rtp_ts, x, y, t_render_ns)``; called on the event loop thread, must be cheap.
TruthCallback = Callable[[int, int, float, float, int], None]
#: ``(frame, rtp_ts, t_due_ns)`` for a frame due and skipped; same thread and order as truth.
NotSentCallback = Callable[[int, int, int], None]


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


class BallTrack(MediaStreamTrack):
    """One session's bouncing-ball video; see the module docstring for pacing and identity."""

    kind = "video"

    def __init__(
        self,
        session_id: str,
        params: PhysicsParams,
        on_truth: TruthCallback,
        *,
        executor: Executor,
        on_not_sent: NotSentCallback | None = None,
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
        self._identity = OriginLearner(origin_confirmations, truth_backlog)  # checks both
        self.session_id: Final = session_id
        self.params: Final = params
        self._on_truth = on_truth
        self._on_not_sent = on_not_sent
        self._executor = executor
        self._clock = clock
        self._monotonic = monotonic
        self._timeline = Timeline(params.fps, startup_grace_s)
        self._buffer_size = buffer_size
        # Touched only by the one generation job in flight (never concurrently).
        self._ball = Ball(params)
        self._renderer = Renderer(params.width, params.height, params.radius)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._error: BaseException | None = None
        self._gen_next = 0  # index the next generation job produces
        self._ready: deque[_Frame] = deque()
        self._inflight: Future[_Frame] | None = None
        self._waiter: asyncio.Future[None] | None = None

        self._sender: Any = None

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
        missing = [a for a in (_SENDER_RTP_TS, _SENDER_PACKETS) if not hasattr(sender, a)]
        if missing:
            raise RuntimeError(
                f"this aiortc's RTCRtpSender has no {', '.join(missing)}: BallTrack cannot learn "
                "the RTP timestamp origin (written for aiortc 1.16.0)"
            )
        if getattr(sender, "track", self) is not self:
            raise ValueError("the sender is not sending this track")
        self._sender = sender

    @property
    def rtp_origin(self) -> int | None:
        """The sender's RTP timestamp origin once confirmed (RTP ts = (origin + pts) mod 2**32)."""
        return self._identity.origin

    @property
    def frames_due(self) -> int:
        """Frame indexes handed to the encoder or skipped so far: frames ``0 .. frames_due-1``."""
        return self._timeline.next

    def pts_of(self, frame: int) -> int:
        """The 90 kHz pts of frame ``frame``."""
        return self._timeline.pts_of(frame)

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
        }

    def stop(self) -> None:
        """End the track: no more frames, generation cancelled, waiting truth counted as lost.

        Idempotent; aiortc also calls it when the sender stops. A generation job already
        running on the executor cannot be interrupted; it finishes within a frame's render time
        and its result is dropped.
        """
        if self._stopped:
            return
        self._stopped = True
        super().stop()
        inflight = self._inflight
        if inflight is not None:
            inflight.cancel()
        self._ready.clear()
        self._identity.abandon()
        self._wake()

    async def recv(self) -> av.VideoFrame:
        """The next due frame (an ``av.VideoFrame``), waiting until it is due."""
        if self._stopped:
            raise MediaStreamError
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._observe_sender()

        now = self._monotonic()
        due = self._timeline.due(now)  # the schedule and what it skips: carom_simulator.timeline
        if due.skipped:
            self._not_sent(due.skipped, now)
            self._skip_to(due.index)
        self._pump()

        delay = due.at - self._monotonic()
        if delay > 0.0:
            await asyncio.sleep(delay)
        frame = await self._take(due.index)

        t_render_ns = self._clock()
        self._timeline.handed(frame.index, due.at, self._monotonic())
        self._pump()

        sender = self._sender
        packets = None if sender is None else getattr(sender, _SENDER_PACKETS)
        self._identity.handed(frame.pts, packets)
        self._truth(PendingTruth(frame.index, frame.pts, frame.x, frame.y, t_render_ns))
        return frame.video

    # ------------------------------------------------------------------------------ generation

    def _generate(self, index: int) -> _Frame:
        """Runs on the executor: advance the ball to frame ``index`` and render it."""
        ball = self._ball
        while ball.frame < index:
            ball.step()
        x, y = ball.position
        video = _video_frame(
            self._renderer.render_i420(x, y), self.params.width, self.params.height
        )
        pts = self.pts_of(index)
        video.pts = pts
        video.time_base = _TIME_BASE
        return _Frame(index, x, y, pts, video)

    def _pump(self) -> None:
        """Start the next generation job if the buffer has room and none is running."""
        if self._stopped or self._error is not None or self._inflight is not None:
            return
        if len(self._ready) >= self._buffer_size:
            return
        try:
            fut = self._executor.submit(self._generate, self._gen_next)
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
        if fut.cancelled() or self._stopped:
            return
        exc = fut.exception()
        if exc is not None:
            self._fail(exc)
            return
        frame = fut.result()
        self._frames_generated += 1
        self._gen_next = max(self._gen_next, frame.index + 1)
        if frame.index < self._timeline.next:
            self._frames_discarded += 1
        else:
            self._ready.append(frame)
            self._wake()
        self._pump()

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
        if self._on_not_sent is None:
            return
        wall, timeline = self._clock(), self._timeline
        for index in skipped:
            t_due = wall - round((now - timeline.due_at(index)) * 1e9)
            self._truth(PendingTruth(index, self.pts_of(index), 0.0, 0.0, t_due, sent=False))

    def _truth(self, pending: PendingTruth) -> None:
        for stamped in self._identity.add(pending):
            self._emit(stamped)

    def _emit(self, stamped: Stamped) -> None:
        t, rtp_ts = stamped.truth, stamped.rtp_ts
        try:
            if t.sent:
                self._on_truth(t.frame, rtp_ts, t.x, t.y, t.t_render_ns)
            else:
                assert self._on_not_sent is not None
                self._on_not_sent(t.frame, rtp_ts, t.t_render_ns)
        except Exception:
            if not self._truth_errors:
                log.exception("session %s: truth callback failed", self.session_id)
            self._truth_errors += 1
        else:
            if t.sent:
                self._truth_emitted += 1
            else:
                self._not_sent_emitted += 1
