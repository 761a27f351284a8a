"""When each frame of a session is due, and which frames are skipped when the sender falls behind.

Pure: times are passed in (the track reads ``time.monotonic``), nothing sleeps here. Frame ``n``
is due at ``start + n / fps``, ``start`` being when the encoder first asked for a frame. When the
encoder asks late, the frames whose time has passed are skipped, not sent late: a skipped frame
keeps the stream on the wall clock (which is what the latency figures are measured against) and
still gets its ``not_sent`` record, so the tracker counts it instead of losing it.

One exception, at start: the first frames wait on aiortc's cold pipeline (x264 set-up,
keyframes, the connection's first packets), not on a busy machine. During the first
``startup_grace_s`` of frames a late request moves the timeline instead, so the late frame is due
now and none is skipped.

Live changes (issue 17). A session's frame rate can change and its stream can stop and resume
mid-session: :meth:`Timeline.rebase` starts a new *segment* at the next frame index, due at a
given time, at a given rate. Frame indexes run on without a gap (frames while stopped are not due:
they have no index), and pts stay tied to the monotonic clock across segments (a segment starting
``d`` seconds after the previous one's start has its first pts ``d * 90000`` ticks later), so the
RTP timestamps the browser sees keep measuring real time through a pause or a rate change, which
is what its jitter buffer assumes. A rebase may carry a fresh grace (a resumed or resized stream
cold-starts its encoder as the first frames did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

#: The RTP clock of video (RFC 3551): pts and RTP timestamps count 90 kHz ticks.
RTP_CLOCK_RATE: Final = 90_000
#: Slack when turning elapsed time into a frame index, so float error never skips a due frame.
_EPS: Final = 1e-9


def _check_fps(fps: float) -> float:
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    return float(fps)


@dataclass(frozen=True)
class Due:
    """What the encoder gets now: frame ``index``, due at ``at``; ``skipped`` were due before it."""

    index: int
    at: float
    skipped: range


class Timeline:
    """A session's frame schedule, with its late-frame and release-lag accounting.

    The schedule is the current segment: frame ``first + k`` is due at ``start + k / fps`` with
    pts ``pts0 + round(k * 90000 / fps)``; before any rebase it is the whole session (``first`` =
    ``pts0`` = 0).
    """

    def __init__(self, fps: float, startup_grace_s: float = 0.0) -> None:
        self.fps = _check_fps(fps)
        self.grace_frames = math.ceil(max(0.0, startup_grace_s) * self.fps)
        "Frames below this index get the start-up grace (``first + ceil(grace_s * fps)``)."
        self.start: float | None = None
        "When the segment's first frame is due (monotonic s); None before the first request."
        self.first = 0
        "The segment's first frame index."
        self.pts0 = 0
        "The segment's first pts."
        self.next = 0
        "The lowest frame index still to hand: frames ``0 .. next-1`` were handed or skipped."
        self.sent = 0
        self.late_dropped = 0
        self._lag_sum = 0.0
        self._lag_max = 0.0

    def due(self, now: float) -> Due:
        """The frame to hand for a request at ``now``; frames whose time has passed are skipped.

        Calling it moves ``next`` past the skipped frames (they are gone either way).
        """
        if self.start is None:
            self.start = now
        elif self.next < self.grace_frames and now - self.start > self._offset(self.next):
            self.start = now - self._offset(self.next)  # grace: move the timeline instead
        wanted = max(self.next, self.first + math.floor((now - self.start) * self.fps + _EPS))
        skipped = range(self.next, wanted)
        self.late_dropped += len(skipped)
        self.next = wanted
        return Due(wanted, self.due_at(wanted), skipped)

    def due_at(self, index: int) -> float:
        """When frame ``index`` is due (monotonic s); only once the first frame was asked for."""
        if self.start is None:
            raise RuntimeError("no frame was asked for yet: the timeline has not started")
        return self.start + self._offset(index)

    def rebase(self, fps: float, at: float | None, grace_s: float = 0.0) -> None:
        """From frame ``next`` on: ``fps`` frames a second, frame ``next`` due at ``at``.

        ``at`` None: as the current schedule has it (a rate change takes effect at the next
        frame, keeping its due time); before the first request nothing is scheduled yet and
        only the rate changes. ``at`` must not be before the current segment's start. ``grace_s``:
        as the start-up grace, for the segment's first frames.
        """
        fps = _check_fps(fps)
        if self.start is None:
            self.fps = fps
            self.grace_frames = max(self.grace_frames, self.next + math.ceil(grace_s * fps))
            return
        at = self.due_at(self.next) if at is None else at
        if at < self.start:
            raise ValueError(f"a segment cannot start ({at}) before the current one ({self.start})")
        self.pts0 += round((at - self.start) * RTP_CLOCK_RATE)
        self.first = self.next
        self.start = at
        self.fps = fps
        self.grace_frames = max(self.grace_frames, self.next + math.ceil(grace_s * fps))

    def _offset(self, index: int) -> float:
        """Seconds from the segment's start to frame ``index``."""
        return (index - self.first) / self.fps

    def handed(self, index: int, at: float, now: float) -> None:
        """Frame ``index``, due at ``at``, went to the encoder at ``now``."""
        lag = max(0.0, now - at)
        self._lag_sum += lag
        self._lag_max = max(self._lag_max, lag)
        self.next = index + 1
        self.sent += 1

    def pts_of(self, index: int) -> int:
        """The 90 kHz pts of frame ``index`` (its RTP timestamp less the stream's origin).

        For indexes of the current segment (and, before any rebase, any index).
        """
        return self.pts0 + round((index - self.first) * RTP_CLOCK_RATE / self.fps)

    @property
    def lag_ms_mean(self) -> float:
        """Mean time a frame was handed after it was due (generation or the loop running late)."""
        return 1e3 * self._lag_sum / self.sent if self.sent else 0.0

    @property
    def lag_ms_max(self) -> float:
        return 1e3 * self._lag_max
