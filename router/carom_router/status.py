"""What the router knows of the parts its sessions depend on, as a sans-I/O state machine.

A session needs three things beyond the router: the Pulsar broker (reports out, live results
in), a tracker (live results exist only while one joins), and the simulator (the video). When
one fails, clients used to be told nothing: during a broker outage a page saw its live results
stop, then 793 arrive at once; the router's ``/health`` called a degraded simulator
"unreachable" and stayed 200 with the tracker dead.

Observations go in (``broker``, ``tracker_seen``, ``simulator``, ``tick``), each with the time;
what comes out is the :class:`carom.protocol.Status` messages to send to every open session, one
per change of a part. ``degraded`` lists what a session opening now must be told, and ``report``
is the body of ``/health``. The asyncio shell (``carom_router.router``) does the watching: a
``LinkWatch`` thread for the broker, the errors topic for the trackers' ``TrackerStatus``, and
``GET /health`` of the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from carom import protocol as p

#: A tracker is up while its last status is younger than this many of its intervals: one late
#: status (a GC pause, a busy broker) is not an outage, three missed ones are.
TRACKER_MISSED_INTERVALS: Final = 3
#: Before any tracker has been heard from, how long after the router's start clients are not yet
#: told "no tracker": a tracker publishes its status every second or so, and the router may
#: have started first.
TRACKER_FIRST_WAIT_S: Final = 5.0
#: Trackers remembered by name (replicas, restarts under new names); the oldest go first.
MAX_TRACKERS: Final = 64
#: A tracker silent for this many of its intervals is forgotten (its replacement has a new name).
TRACKER_FORGET_INTERVALS: Final = 60

SimulatorState = Literal["unknown", "up", "degraded", "down"]


@dataclass
class _Tracker:
    seen: float
    interval_s: float
    behind_ms: int


@dataclass
class Dependencies:
    """The parts' states; times are seconds on one monotonic clock, passed in."""

    started: float
    broker_up: bool = True
    broker_down_since: float | None = None
    broker_outages: int = 0
    broker_last_outage_s: float = 0.0
    simulator_state: SimulatorState = "unknown"
    simulator_detail: str = ""
    _trackers: dict[str, _Tracker] = field(default_factory=dict)
    #: When any tracker was last heard from (kept when the tracker itself is forgotten).
    _last_seen: float | None = None
    _degraded: dict[p.StatusPart, p.Status] = field(default_factory=dict)

    # --- observations -----------------------------------------------------------------------

    def broker(self, up: bool, now: float, queued: int = 0) -> list[p.Status]:
        """The broker link went down or came back (``LinkWatch``)."""
        if up == self.broker_up:
            return []
        self.broker_up = up
        if not up:
            self.broker_down_since = now
            self.broker_outages += 1
            return self._set(
                "broker",
                False,
                f"the Pulsar broker is unreachable: your reports are kept ({queued} queued) and"
                " sent when it is back; live results pause until then",
            )
        outage = now - (self.broker_down_since or now)
        self.broker_down_since = None
        self.broker_last_outage_s = outage
        return self._set(
            "broker",
            True,
            f"the Pulsar broker is back after {outage:.1f} s; results held meanwhile follow",
        )

    def tracker_seen(
        self, name: str, interval_s: float, behind_ms: int, now: float
    ) -> list[p.Status]:
        """A ``TrackerStatus`` arrived."""
        since = self._last_seen if self._last_seen is not None else self.started
        self._last_seen = now
        self._trackers.pop(name, None)  # re-insert: the dict stays oldest-first
        self._trackers[name] = _Tracker(now, interval_s, behind_ms)
        while len(self._trackers) > MAX_TRACKERS:
            del self._trackers[next(iter(self._trackers))]
        return self._set(
            "tracker", True, f"tracker {name} is back (live results had stopped for"
            f" {now - since:.1f} s)",
        )  # fmt: skip

    def simulator(self, state: SimulatorState, detail: str) -> list[p.Status]:
        """The outcome of a look at the simulator's ``/health``."""
        self.simulator_state, self.simulator_detail = state, detail
        if state == "up":
            return self._set("simulator", True, "the simulator is back")
        if state == "degraded":
            return self._set("simulator", False, f"the simulator is degraded: {detail}")
        if state == "down":
            return self._set("simulator", False, f"the simulator is unreachable: {detail}")
        return []

    def tick(self, now: float) -> list[p.Status]:
        """Periodic: a tracker falling silent is noticed here, not by a message."""
        for name in [n for n, t in self._trackers.items() if self._forgotten(t, now)]:
            del self._trackers[name]
        if self._tracker_up(now) or "tracker" in self._degraded:
            return []
        if self._last_seen is None:
            if now - self.started < TRACKER_FIRST_WAIT_S:
                return []
            return self._set(
                "tracker",
                False,
                f"no tracker has been heard from since the router started"
                f" {now - self.started:.0f} s ago: there are no live results",
            )
        return self._set(
            "tracker",
            False,
            f"no tracker has been heard from for {now - self._last_seen:.1f} s:"
            " live results have stopped",
        )

    # --- what to say ------------------------------------------------------------------------

    def degraded(self) -> list[p.Status]:
        """What a session opening now is told: each part that is degraded, as last announced."""
        return list(self._degraded.values())

    def all_up(self, now: float) -> bool:
        return self.broker_up and self.simulator_state == "up" and self._tracker_up(now)

    def report(self, now: float, queued: int) -> dict[str, object]:
        """``/health``'s body: each part's state and how long, not just a word."""
        broker: dict[str, object] = {
            "state": "connected" if self.broker_up else "disconnected",
            "queued": queued,
            "outages": self.broker_outages,
        }
        if self.broker_down_since is not None:
            broker["down_s"] = round(now - self.broker_down_since, 1)
        elif self.broker_outages:
            broker["last_outage_s"] = round(self.broker_last_outage_s, 1)
        simulator: dict[str, object] = {"state": self.simulator_state}
        if self.simulator_detail:
            simulator["detail"] = self.simulator_detail
        tracker: dict[str, object] = {"state": self._tracker_state(now)}
        if self._last_seen is not None:
            tracker["silent_s"] = round(now - self._last_seen, 1)
        tracker["trackers"] = {
            name: {"seen_s_ago": round(now - t.seen, 1), "behind_ms": t.behind_ms}
            for name, t in self._trackers.items()
        }
        return {
            "status": "ok" if self.all_up(now) else "degraded",
            "broker": broker,
            "simulator": simulator,
            "tracker": tracker,
        }

    # --- internals ----------------------------------------------------------------------------

    def _set(self, part: p.StatusPart, up: bool, detail: str) -> list[p.Status]:
        """Announce a change of ``part``; nothing when it is already in that state."""
        if up:
            if self._degraded.pop(part, None) is None:
                return []
            return [p.Status(state="recovered", part=part, detail=detail)]
        status = p.Status(state="degraded", part=part, detail=detail)
        known = self._degraded.get(part)
        self._degraded[part] = status
        return [] if known is not None else [status]

    def _tracker_up(self, now: float) -> bool:
        return any(
            now - t.seen <= TRACKER_MISSED_INTERVALS * t.interval_s for t in self._trackers.values()
        )

    def _forgotten(self, t: _Tracker, now: float) -> bool:
        return now - t.seen > TRACKER_FORGET_INTERVALS * t.interval_s

    def _tracker_state(self, now: float) -> str:
        if self._tracker_up(now):
            return "up"
        return "never_seen" if self._last_seen is None else "silent"
