"""What the router tells clients and /health about the broker, trackers and simulator, in memory."""

from __future__ import annotations

from carom import protocol as p
from carom_router.status import (
    MAX_TRACKERS,
    TRACKER_FIRST_WAIT_S,
    TRACKER_MISSED_INTERVALS,
    Dependencies,
)

T0 = 1000.0


def up(d: Dependencies, now: float) -> None:
    """Every part up: a tracker heard and the simulator healthy."""
    d.tracker_seen("t1", 1.0, 0, now)
    d.simulator("up", "")
    assert d.all_up(now)


def test_a_broker_outage_is_told_once_each_way() -> None:
    d = Dependencies(started=T0)
    up(d, T0)
    (lost,) = d.broker(False, T0 + 1, queued=12)
    assert (lost.state, lost.part) == ("degraded", "broker") and "12 queued" in lost.detail
    assert d.broker(False, T0 + 2) == []  # still down: nothing new
    assert d.degraded() == [lost] and not d.all_up(T0 + 2)
    report = d.report(T0 + 6, queued=40)
    assert report["status"] == "degraded"
    assert report["broker"] == {"state": "disconnected", "queued": 40, "outages": 1, "down_s": 5.0}
    (back,) = d.broker(True, T0 + 31.2)
    assert (back.state, back.part) == ("recovered", "broker") and "30.2 s" in back.detail
    assert d.degraded() == []
    assert d.report(T0 + 32, 0)["broker"] == {
        "state": "connected", "queued": 0, "outages": 1, "last_outage_s": 30.2,
    }  # fmt: skip


def test_a_tracker_never_heard_from_is_told_after_a_grace() -> None:
    d = Dependencies(started=T0)
    assert d.tick(T0 + TRACKER_FIRST_WAIT_S - 0.1) == []  # it may just be starting
    assert d.report(T0 + 1, 0)["tracker"] == {"state": "never_seen", "trackers": {}}
    (silent,) = d.tick(T0 + TRACKER_FIRST_WAIT_S)
    assert (silent.state, silent.part) == ("degraded", "tracker")
    assert "since the router started" in silent.detail
    assert d.tick(T0 + 10) == []
    (back,) = d.tracker_seen("carom-tracker-a", 1.0, 0, T0 + 12)
    assert back.state == "recovered" and "carom-tracker-a" in back.detail
    assert d.report(T0 + 12.5, 0)["tracker"] == {
        "state": "up", "silent_s": 0.5,
        "trackers": {"carom-tracker-a": {"seen_s_ago": 0.5, "behind_ms": 0}},
    }  # fmt: skip


def test_a_tracker_is_silent_after_three_of_its_intervals() -> None:
    d = Dependencies(started=T0)
    up(d, T0)
    assert d.tracker_seen("t1", 1.0, 250, T0 + 1) == []  # every second: up
    limit = T0 + 1 + TRACKER_MISSED_INTERVALS * 1.0
    assert d.tick(limit) == [] and d.all_up(limit)
    (silent,) = d.tick(limit + 0.05)
    assert silent.state == "degraded" and "for 3.0 s" in silent.detail
    tracker = d.report(limit + 1, 0)["tracker"]
    assert isinstance(tracker, dict) and tracker["state"] == "silent" and tracker["silent_s"] == 4.0
    (back,) = d.tracker_seen("t2", 1.0, 0, limit + 2)  # a replica or a restart: any tracker will do
    assert back.state == "recovered" and "stopped for 5.0 s" in back.detail
    assert d.all_up(limit + 2)


def test_one_of_two_trackers_going_silent_is_not_an_outage() -> None:
    d = Dependencies(started=T0)
    up(d, T0)
    for i in range(1, 20):
        d.tracker_seen("t2", 1.0, 0, T0 + i)  # t1 stops; t2 carries on
        assert d.tick(T0 + i + 0.5) == []


def test_trackers_are_remembered_within_bounds() -> None:
    d = Dependencies(started=T0)
    for i in range(MAX_TRACKERS + 50):
        d.tracker_seen(f"t{i}", 1.0, 0, T0 + i * 0.001)
    trackers = d.report(T0 + 1, 0)["tracker"]
    assert isinstance(trackers, dict) and isinstance(trackers["trackers"], dict)
    assert len(trackers["trackers"]) == MAX_TRACKERS and "t0" not in trackers["trackers"]
    d.tick(T0 + 1000)  # all long silent: forgotten, but the silence is still known
    tracker = d.report(T0 + 1000, 0)["tracker"]
    assert isinstance(tracker, dict) and tracker["trackers"] == {} and tracker["state"] == "silent"


def test_the_simulator_degraded_down_and_back() -> None:
    d = Dependencies(started=T0)
    up(d, T0)
    (deg,) = d.simulator("degraded", "pulsar: disconnected")
    assert (deg.state, deg.part) == ("degraded", "simulator")
    assert "pulsar: disconnected" in deg.detail
    assert d.simulator("down", "ConnectError: refused") == []  # still not up: no second message
    assert d.report(T0, 0)["simulator"] == {"state": "down", "detail": "ConnectError: refused"}
    assert "unreachable" in d.degraded()[0].detail  # a session opening now hears the latest
    (back,) = d.simulator("up", "")
    assert back == p.Status(state="recovered", part="simulator", detail="the simulator is back")
    assert d.simulator("up", "") == []


def test_nothing_is_announced_while_all_is_well() -> None:
    d = Dependencies(started=T0)
    assert d.simulator("unknown", "") == [] and d.broker(True, T0) == []
    up(d, T0)
    assert d.tick(T0 + 2) == [] and d.degraded() == []
    assert d.report(T0 + 2, 0)["status"] == "ok"
