"""What "frames due" and "coverage" mean, written once for the tracker's report, the run command,
the benchmarks and the Python client (the page implements the same in JavaScript; the definition
in words is docs/accounting.md).

A session's frames are numbered from 0 on the simulator's real timeline. Every index up to the
last one the simulator handed out is *due*, whether it was sent or skipped. Each frame due ends in
exactly one of the ``carom.schemas.Status`` values (``ok``, ``not_detected``, ``missed``,
``not_sent``); a due frame with none of them (its truth was lost on the way) is ``no_row``, so
nothing can vanish from the totals. Coverage is ``ok / due``: the share of frames due that got an
L2 error. Orphan reports are not frames and never count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from carom.schemas import Status

__all__ = ["Coverage", "count"]


@dataclass(frozen=True, slots=True)
class Coverage:
    """The fate of a set of frames due (one session, or several added together)."""

    due: int
    ok: int = 0
    not_detected: int = 0
    missed: int = 0
    not_sent: int = 0

    @property
    def no_row(self) -> int:
        """Frames due with no result at all (a lost truth): never hidden, never negative."""
        return max(0, self.due - self.ok - self.not_detected - self.missed - self.not_sent)

    @property
    def fraction(self) -> float:
        """``ok / due``; 0 for no frame due (nothing measured is not a perfect score)."""
        return self.ok / self.due if self.due else 0.0

    def __add__(self, other: Coverage) -> Coverage:
        return Coverage(
            self.due + other.due,
            self.ok + other.ok,
            self.not_detected + other.not_detected,
            self.missed + other.missed,
            self.not_sent + other.not_sent,
        )

    def line(self) -> str:
        """One human line, the same words everywhere Carom prints coverage."""
        return (
            f"coverage {self.ok}/{self.due} frames due ok ({100 * self.fraction:.2f}%): "
            f"{self.not_detected} not detected, {self.missed} missed, {self.not_sent} not sent, "
            f"{self.no_row} with no row"
        )


def count(frames: Iterable[tuple[int, Status]], frames_due: int | None = None) -> Coverage:
    """Coverage of one session from its ``(frame, status)`` results (each frame once).

    ``frames_due`` defaults to the highest frame index seen + 1: every index below the last one
    is due even if nothing about it arrived. A frame counted twice is a bug upstream: raises.
    """
    seen: set[int] = set()
    tally = {"ok": 0, "not_detected": 0, "missed": 0, "not_sent": 0}
    for frame, status in frames:
        if frame in seen:
            raise ValueError(f"frame {frame} counted twice")
        seen.add(frame)
        tally[status] += 1
    due = (max(seen) + 1 if seen else 0) if frames_due is None else frames_due
    if seen and max(seen) >= due:
        raise ValueError(f"frame {max(seen)} is beyond the {due} frames due")
    return Coverage(due, tally["ok"], tally["not_detected"], tally["missed"], tally["not_sent"])
