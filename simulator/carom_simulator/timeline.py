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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

#: The RTP clock of video (RFC 3551): pts and RTP timestamps count 90 kHz ticks.
RTP_CLOCK_RATE: Final = 90_000
#: Slack when turning elapsed time into a frame index, so float error never skips a due frame.
_EPS: Final = 1e-9


@dataclass(frozen=True)
class Due:
    """What the encoder gets now: frame ``index``, due at ``at``; ``skipped`` were due before it."""

    index: int
    at: float
    skipped: range


class Timeline:
    """A session's frame schedule at ``fps``, with its late-frame and release-lag accounting."""

    def __init__(self, fps: float, startup_grace_s: float = 0.0) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps}")
        self.fps: Final = float(fps)
        self.grace_frames: Final = math.ceil(max(0.0, startup_grace_s) * self.fps)
        self.start: float | None = None
        "When the first frame was asked for (monotonic s); None before."
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
        elif self.next < self.grace_frames and now - self.start > self.next / self.fps:
            self.start = now - self.next / self.fps  # start-up grace: move the timeline instead
        wanted = max(self.next, math.floor((now - self.start) * self.fps + _EPS))
        skipped = range(self.next, wanted)
        self.late_dropped += len(skipped)
        self.next = wanted
        return Due(wanted, self.due_at(wanted), skipped)

    def due_at(self, index: int) -> float:
        """When frame ``index`` is due (monotonic s); only once the first frame was asked for."""
        if self.start is None:
            raise RuntimeError("no frame was asked for yet: the timeline has not started")
        return self.start + index / self.fps

    def handed(self, index: int, at: float, now: float) -> None:
        """Frame ``index``, due at ``at``, went to the encoder at ``now``."""
        lag = max(0.0, now - at)
        self._lag_sum += lag
        self._lag_max = max(self._lag_max, lag)
        self.next = index + 1
        self.sent += 1

    def pts_of(self, index: int) -> int:
        """The 90 kHz pts of frame ``index`` (its RTP timestamp less the stream's origin)."""
        return round(index * RTP_CLOCK_RATE / self.fps)

    @property
    def lag_ms_mean(self) -> float:
        """Mean time a frame was handed after it was due (generation or the loop running late)."""
        return 1e3 * self._lag_sum / self.sent if self.sent else 0.0

    @property
    def lag_ms_max(self) -> float:
        return 1e3 * self._lag_max
