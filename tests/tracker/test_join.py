"""The tracker's join, driven in memory with a made-up clock."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from carom import schemas
from carom.schemas import Centroid, NotSent, SessionEnd, Truth
from carom_tracker.join import Batch, Joiner, Result, Unjoined

T0 = 1_795_000_000 * 10**9
MS = 1_000_000
WIN = 2000 * MS


def truth(
    rtp: int, *, sid: str = "s1", frame: int = 7, x: float = 100.0, y: float = 200.0
) -> Truth:
    return Truth(session_id=sid, frame=frame, rtp_ts=rtp, x=x, y=y, t_render_ns=T0 - 50 * MS)


def report(
    rtp: int, *, sid: str = "s1", x: float | None = 103.0, y: float | None = 204.0
) -> Centroid:
    detected = x is not None
    return Centroid(
        session_id=sid,
        rtp_ts=rtp,
        detected=detected,
        x=x,
        y=y if detected else None,
        t_browser_recv_ns=T0 - 30 * MS,
        t_browser_analysed_ns=T0 - 20 * MS,
        t_router_recv_ns=T0 - 10 * MS,
        t_published_ns=T0 - 9 * MS,
    )


def one(batch: Batch) -> Result:
    assert not batch.acks and not batch.unjoined
    (result,) = batch.results
    return result


def quiet(batch: Batch) -> None:
    assert batch == Batch(), batch


def test_in_order_join_has_exact_l2_and_every_hop() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_truth(truth(9000), T0, "t"))
    r = one(j.add_report(report(9000), T0 + 3 * MS, "r"))
    assert (r.status, r.l2, r.x, r.y, r.truth_x, r.truth_y) == ("ok", 5.0, 103.0, 204.0, 100, 200)
    assert r.tokens == ("t", "r") and r.frame == 7 and r.session_id == "s1" and r.rtp_ts == 9000
    assert r.t_render_ns == T0 - 50 * MS and r.t_browser_recv_ns == T0 - 30 * MS
    assert r.t_browser_analysed_ns == T0 - 20 * MS and r.t_router_recv_ns == T0 - 10 * MS
    assert r.t_published_ns == T0 - 9 * MS
    assert r.t_tracker_consumed_ns == T0 + 3 * MS == r.t_computed_ns
    assert (r.t_truth_consumed_ns, r.t_report_consumed_ns) == (T0, T0 + 3 * MS)
    err = r.to_error_result()
    assert err is not None and schemas.validate(err) == err and err.l2 == 5.0
    c = j.counters()
    assert c["joined_ok"] == 1 and c["pending_truth"] == c["pending_reports"] == 0
    quiet(j.expire(T0 + 10 * WIN))


@pytest.mark.parametrize(
    ("dx", "dy", "l2"),
    [
        (0.0, 0.0, 0.0),
        (3.0, 4.0, 5.0),
        (-5.0, 12.0, 13.0),
        (0.5, 0.0, 0.5),
        (1.0, 1.0, math.sqrt(2)),
    ],
)
def test_l2_is_euclidean_in_pixels(dx: float, dy: float, l2: float) -> None:
    j = Joiner()
    j.add_truth(truth(1, x=50.0, y=60.0), T0)
    r = one(j.add_report(report(1, x=50.0 + dx, y=60.0 + dy), T0))
    assert r.l2 == l2


def test_report_before_truth_joins_and_truth_token_comes_first() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_report(report(5), T0, "r"))
    r = one(j.add_truth(truth(5), T0 + 40 * MS, "t"))
    assert r.status == "ok" and r.tokens == ("t", "r")
    assert r.t_tracker_consumed_ns == T0 + 40 * MS  # the truth came second


def test_late_within_window_joins_and_at_the_window_it_does_not() -> None:
    j = Joiner(window_ns=WIN)
    j.add_truth(truth(1), T0, "t1")
    assert one(j.add_report(report(1), T0 + WIN - 1, "r1")).status == "ok"

    j.add_truth(truth(2), T0 + WIN, "t2")
    batch = j.add_report(report(2), T0 + 2 * WIN, "r2")
    (missed,) = batch.results
    assert missed.status == "missed" and missed.tokens == ("t2",) and batch.acks == ["r2"]
    assert j.counters()["late_reports"] == 1


def test_missed_after_the_window() -> None:
    j = Joiner(window_ns=WIN)
    j.add_truth(truth(1, frame=3), T0, "t")
    quiet(j.expire(T0 + WIN - 1))
    r = one(j.expire(T0 + WIN))
    assert (r.status, r.frame, r.tokens, r.t_computed_ns) == ("missed", 3, ("t",), T0 + WIN)
    assert r.x is None and r.y is None and r.l2 is None and r.t_tracker_consumed_ns is None
    assert r.t_browser_recv_ns is None and r.t_published_ns is None
    assert r.t_truth_consumed_ns == T0 and not r.evicted
    err = r.to_error_result()
    assert err is not None and schemas.validate(err).status == "missed" and err.l2 is None
    quiet(j.expire(T0 + 5 * WIN))
    assert j.counters()["missed"] == 1


def test_duplicate_truth_is_acked_once_and_never_rowed() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_truth(truth(1), T0, "t"))
    assert j.add_truth(truth(1, x=1.0), T0 + MS, "t-dup-pending").acks == ["t-dup-pending"]
    r = one(j.add_report(report(1), T0 + 2 * MS, "r"))
    assert r.truth_x == 100.0 and r.tokens == ("t", "r")  # the first truth wins
    assert j.add_truth(truth(1), T0 + 3 * MS, "t-dup-joined") == Batch(acks=["t-dup-joined"])
    quiet(j.expire(T0 + 10 * WIN))
    assert j.counters()["duplicate_truth"] == 2 and j.counters()["joined_ok"] == 1


def test_duplicate_report_is_acked_once_and_never_rowed() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_report(report(1), T0, "r"))
    assert j.add_report(report(1, x=9.0), T0 + MS, "r-dup-pending") == Batch(acks=["r-dup-pending"])
    assert one(j.add_truth(truth(1), T0 + 2 * MS, "t")).x == 103.0
    assert j.add_report(report(1), T0 + 3 * MS, "r-dup-joined") == Batch(acks=["r-dup-joined"])
    j.add_truth(truth(2), T0 + 4 * MS, "t2")
    assert one(j.expire(T0 + 4 * MS + WIN)).status == "missed"
    # A second truth for a missed frame is a duplicate; its report, late.
    assert j.add_truth(truth(2), T0 + WIN, "t2-dup").acks == ["t2-dup"]
    assert j.add_report(report(2), T0 + WIN, "r2-late").acks == ["r2-late"]
    c = j.counters()
    assert (c["duplicate_reports"], c["duplicate_truth"], c["late_reports"]) == (2, 1, 1)


def test_orphan_report() -> None:
    j = Joiner(window_ns=WIN)
    j.add_report(report(77, x=10.0, y=20.0), T0, "r")
    r = one(j.expire(T0 + WIN))
    assert (r.status, r.tokens, r.frame, r.truth_x, r.truth_y, r.l2) == (
        "orphan", ("r",), None, None, None, None,
    )  # fmt: skip
    assert (r.x, r.y, r.t_router_recv_ns, r.t_render_ns) == (10.0, 20.0, T0 - 10 * MS, None)
    assert r.to_error_result() is None
    # Its truth turning up afterwards still makes the frame's one row: missed (the report came,
    # but not within the window), acked with that row.
    late = one(j.add_truth(truth(77), T0 + WIN + 1, "t"))
    assert (late.status, late.frame, late.tokens, late.x, late.l2) == (
        "missed",
        7,
        ("t",),
        None,
        None,
    )
    assert late.reason == "truth_late"
    assert j.add_truth(truth(77), T0 + WIN + 2, "t2") == Batch(acks=["t2"])  # then a duplicate
    c = j.counters()
    assert (c["orphans"], c["late_truth"], c["missed"], c["duplicate_truth"]) == (1, 1, 1, 1)


def test_a_held_clock_waits_for_the_streams_not_the_wall() -> None:
    """Draining a backlog: the window runs on the topics' publish times (``hold_clock``)."""
    j = Joiner(window_ns=WIN)
    j.hold_clock(T0)  # both topics have joined messages published up to T0
    j.add_truth(truth(1), T0, "t1")
    # The wall clock runs far ahead while the report topic's backlog is still being joined.
    assert j.expire(T0 + 10 * WIN) == Batch()
    j.hold_clock(T0 + WIN - 1)
    r = one(j.add_report(report(1), T0 + 10 * WIN + 1, "r1"))
    assert (r.status, r.tokens) == ("ok", ("t1", "r1"))
    assert r.t_computed_ns == T0 + 10 * WIN + 1  # rows keep the wall clock
    j.add_truth(truth(2), T0 + 10 * WIN + 2, "t2")  # waits from the held clock, T0 + WIN - 1
    assert j.expire(T0 + 20 * WIN) == Batch()
    j.hold_clock(None)  # caught up: the wall clock again
    assert one(j.expire(T0 + 20 * WIN)).status == "missed"
    j.hold_clock(T0)  # a limit behind the clock never turns it back
    j.add_truth(truth(3), T0 + 20 * WIN, "t3")
    j.hold_clock(None)
    assert j.expire(T0 + 21 * WIN - 1) == Batch()
    assert one(j.expire(T0 + 21 * WIN)).status == "missed"


def test_not_detected_is_never_zero_error() -> None:
    j = Joiner()
    j.add_truth(truth(1), T0, "t")
    r = one(j.add_report(report(1, x=None), T0, "r"))
    assert (r.status, r.l2, r.x, r.y, r.tokens) == ("not_detected", None, None, None, ("t", "r"))
    err = r.to_error_result()
    assert err is not None and schemas.validate(err).l2 is None
    assert j.counters()["not_detected"] == 1 and j.counters()["joined_ok"] == 0


def test_rtp_wrap_around_inside_a_session() -> None:
    # 60 fps at 90 kHz is 1500 ticks a frame; this session crosses 2**32 - 1 -> 0 mid-way.
    rtps = [(2**32 - 4 * 1500 + i * 1500) % 2**32 for i in range(8)]
    assert rtps[3] == 2**32 - 1500 and rtps[4] == 0
    rng = random.Random(7)
    j = Joiner(window_ns=WIN)
    events: list[tuple[str, int, int]] = [(k, i, r) for i, r in enumerate(rtps) for k in "tr"]
    rng.shuffle(events)
    rows: list[Result] = []
    for n, (kind, i, rtp) in enumerate(events):
        now = T0 + n * MS
        if kind == "t":
            batch = j.add_truth(truth(rtp, frame=1000 + i, x=10.0 * i), now, ("t", i))
        else:
            batch = j.add_report(report(rtp, x=10.0 * i + 3, y=204.0), now, ("r", i))
        rows += batch.results
    assert len(rows) == 8 and all(r.status == "ok" and r.l2 == 5.0 for r in rows)
    assert {(r.frame, r.rtp_ts) for r in rows} == {(1000 + i, r) for i, r in enumerate(rtps)}
    for r in rows:
        assert r.frame is not None and r.tokens == (("t", r.frame - 1000), ("r", r.frame - 1000))
    # Duplicates on both sides of the wrap are still recognised.
    assert j.add_report(report(2**32 - 1500), T0 + WIN, "d1").acks == ["d1"]
    assert j.add_truth(truth(0), T0 + WIN, "d2").acks == ["d2"]
    # Expiry follows arrival order, not rtp order (which a wrap would turn upside down).
    j.add_truth(truth(6000), T0 + WIN, "after")
    j.add_truth(truth(2**32 - 7500), T0 + WIN + 1, "before")
    assert [r.tokens for r in j.expire(T0 + 3 * WIN).results] == [("after",), ("before",)]


def test_many_sessions_interleaved_with_the_same_rtp_values() -> None:
    rng = random.Random(11)
    sessions = [f"s{k}" for k in range(20)]
    events = [(kind, s, f) for s in sessions for f in range(30) for kind in "tr"]
    rng.shuffle(events)
    j = Joiner(window_ns=WIN)
    rows: list[Result] = []
    for n, (kind, s, f) in enumerate(events):
        k = int(s[1:])
        rtp = 1000 + 1500 * f  # the same identities in every session
        if kind == "t":
            rows += j.add_truth(truth(rtp, sid=s, frame=f, x=float(k)), T0 + n * 1000).results
        else:
            rep = report(rtp, sid=s, x=float(k) + 0.5 * f, y=200.0)
            rows += j.add_report(rep, T0 + n * 1000).results
    assert len(rows) == 600 and all(r.status == "ok" for r in rows)
    for r in rows:
        assert r.frame is not None and r.l2 == 0.5 * r.frame  # joined within its own session
        assert r.truth_x == float(r.session_id[1:])
    assert len({(r.session_id, r.rtp_ts) for r in rows}) == 600
    c = j.counters()
    assert c["finalised_keys"] == 600 and c["sessions"] == 0  # nothing left waiting


def test_results_of_one_call_come_in_a_stable_order() -> None:
    j = Joiner(window_ns=WIN, max_pending=3)
    j.add_truth(truth(1, sid="b"), T0, "b1")
    j.add_report(report(1, sid="a"), T0 + 1, "a1")
    for i in (2, 3, 4):
        j.add_truth(truth(i, sid="a"), T0 + i, f"a{i}")
    # Expiries in arrival order across sessions, then the cap eviction, then the new arrival.
    batch = j.add_truth(truth(5, sid="a"), T0 + WIN + 1, "a5")
    assert [(r.tokens, r.evicted) for r in batch.results] == [
        (("b1",), False), (("a1",), False), (("a2",), True),
    ]  # fmt: skip
    batch = j.add_report(report(5, sid="a"), T0 + WIN + 3, "r5")
    assert [r.tokens for r in batch.results] == [("a3",), ("a5", "r5")]


def test_a_clock_stepping_back_neither_expires_nor_revives() -> None:
    j = Joiner(window_ns=WIN)
    j.add_truth(truth(1), T0, "t1")
    j.add_truth(truth(2), T0 + WIN - 1, "t2")
    assert one(j.expire(T0 + WIN)).tokens == ("t1",)
    j.add_truth(truth(3), T0, "t3")  # wall clock went back 2 s: t3 still gets a full window
    quiet(j.expire(T0 + WIN + 1))
    assert [r.tokens for r in j.expire(T0 + 2 * WIN).results] == [("t2",), ("t3",)]


def test_consumed_ns_separates_consumption_from_the_join() -> None:
    j = Joiner()
    j.add_report(report(1), T0 + 5 * MS, "r", consumed_ns=T0 + 4 * MS)
    r = one(j.add_truth(truth(1), T0 + 9 * MS, "t", consumed_ns=T0 + 7 * MS))
    assert (r.t_tracker_consumed_ns, r.t_computed_ns) == (T0 + 7 * MS, T0 + 9 * MS)
    assert (r.t_truth_consumed_ns, r.t_report_consumed_ns) == (T0 + 7 * MS, T0 + 4 * MS)


def test_flush_all_hands_back_waiting_messages_unjoined() -> None:
    j = Joiner(window_ns=WIN)
    j.add_truth(truth(1), T0, "due")
    j.add_truth(truth(2), T0 + WIN, "t2")
    j.add_report(report(3), T0 + WIN + 1, "r3")
    j.add_truth(truth(4), T0 + WIN + 2, "t4")
    j.add_report(report(4), T0 + WIN + 3, "r4")
    batch = j.flush_all(T0 + WIN + 10)
    assert [r.tokens for r in batch.results] == []  # "due" was finalised by the add at T0 + WIN
    assert [(u.token, u.t_consumed_ns) for u in batch.unjoined] == [
        ("t2", T0 + WIN), ("r3", T0 + WIN + 1),
    ]  # fmt: skip
    assert isinstance(batch.unjoined[0].message, Truth)
    assert batch.ack_tokens() == []
    c = j.counters()
    assert (c["missed"], c["orphans"], c["unjoined_at_shutdown"]) == (1, 0, 2)
    assert c["pending_truth"] == c["pending_reports"] == c["sessions"] == c["finalised_keys"] == 0
    # A restart (or the same joiner) re-consumes them and joins properly.
    j.add_truth(truth(3), T0 + WIN + 20, "t3")
    quiet(j.add_report(report(2), T0 + WIN + 21, "r2"))
    assert [r.tokens for r in j.add_report(report(3), T0 + WIN + 22, "r3").results] == [
        ("t3", "r3"),
    ]
    assert j.add_truth(truth(2), T0 + WIN + 23, "t2").results[0].tokens == ("t2", "r2")


def test_flush_all_finalises_what_is_due_first() -> None:
    j = Joiner(window_ns=WIN)
    j.add_truth(truth(1), T0, "due")
    j.add_truth(truth(2), T0 + 1, "waiting")
    batch = j.flush_all(T0 + WIN)
    assert [r.tokens for r in batch.results] == [("due",)]
    assert [u.token for u in batch.unjoined] == ["waiting"]


def test_memory_stays_bounded_under_a_flood_of_unmatched_reports() -> None:
    j = Joiner(window_ns=WIN, max_pending=16, max_sessions=4, max_finalised=64)
    j.add_truth(truth(10**9), T0, "the-truth")
    orphans = 0
    for i in range(10_000):
        batch = j.add_report(report(i), T0 + i, ("r", i))
        assert all(r.status == "orphan" and r.evicted for r in batch.results)
        orphans += len(batch.results)
        c = j.counters()
        assert c["pending_reports"] <= 16 and c["finalised_keys"] <= 64
    c = j.counters()
    assert orphans == c["orphans"] == c["evicted_over_cap"] == 10_000 - 16
    # The flood never pushed out the waiting truth.
    assert c["pending_truth"] == 1
    assert one(j.add_report(report(10**9), T0 + 10_001, "r")).tokens == ("the-truth", "r")


def test_sessions_are_capped_least_recently_active_first() -> None:
    j = Joiner(window_ns=WIN, max_sessions=4)
    for k in range(4):
        j.add_truth(truth(1, sid=f"s{k}"), T0 + k, f"s{k}")
    j.add_report(report(2, sid="s0"), T0 + 5)  # s0 is active again; s1 is now the oldest
    batch = j.add_truth(truth(1, sid="s9"), T0 + 6, "s9")
    assert [(r.session_id, r.status, r.evicted) for r in batch.results] == [("s1", "missed", True)]
    for k in range(100):
        j.add_report(report(k, sid=f"flood{k}"), T0 + 10 + k)
        assert j.counters()["sessions"] <= 4
    c = j.counters()
    assert c["sessions_evicted"] == 101 and c["evicted_over_cap"] == c["missed"] + c["orphans"]


def test_finalised_keys_are_forgotten_after_the_ttl_and_idle_sessions_go() -> None:
    j = Joiner(window_ns=WIN, max_finalised=8, finalised_ttl_ns=10 * WIN)
    for i in range(20):
        j.add_truth(truth(i), T0 + i, None)
        j.add_report(report(i), T0 + i, None)
    assert j.counters()["finalised_keys"] == 8
    assert j.add_report(report(19), T0 + 10 * WIN - 1, "dup").acks == ["dup"]
    quiet(j.expire(T0 + 10 * WIN + 20))
    assert j.counters()["finalised_keys"] == 0 and j.counters()["sessions"] == 0


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="window_ns"):
        Joiner(window_ns=0)
    with pytest.raises(ValueError, match="max_pending"):
        Joiner(max_pending=0)


@dataclass(frozen=True)
class _Frame:
    truth: Truth
    report: Centroid


Msg = Truth | NotSent | SessionEnd | Centroid


def _feed(j: Joiner, msg: Msg, now: int, token: object) -> Batch:
    if isinstance(msg, Truth):
        return j.add_truth(msg, now, token)
    if isinstance(msg, NotSent):
        return j.add_not_sent(msg, now, token)
    if isinstance(msg, SessionEnd):
        return j.add_end(msg, now, token)
    return j.add_report(msg, now, token)


def _check_counters(j: Joiner, unjoined: list[Unjoined]) -> None:
    c = j.counters()
    truths = sum(isinstance(u.message, Truth) for u in unjoined)
    reports = sum(isinstance(u.message, Centroid) for u in unjoined)
    assert c["truth_in"] == (
        c["joined_ok"] + c["not_detected"] + c["missed"] + c["not_sent"] + c["duplicate_truth"]
        + c["pending_truth"] + truths
    )  # fmt: skip
    assert c["late_truth"] <= c["missed"]
    assert c["reports_in"] == (
        c["joined_ok"] + c["not_detected"] + c["orphans"] + c["duplicate_reports"]
        + c["late_reports"] + c["pending_reports"] + reports
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(8))
def test_every_token_comes_back_exactly_once_across_a_restart(seed: int) -> None:
    """Random interleavings, duplicates, losses, late arrivals, caps, and a restart mid-stream."""
    rng = random.Random(seed)
    events: list[tuple[int, str, Msg]] = []  # (consumed at, tie-break, message)
    frames: dict[tuple[str, int], _Frame] = {}
    not_sent: dict[tuple[str, int], NotSent] = {}
    for s in range(8):
        sid = f"s{s}"
        origin = rng.choice([2**32 - 40 * 1500, rng.randrange(2**32)])  # often wraps mid-session
        start = T0 + rng.randrange(0, 3 * WIN)
        count = rng.randrange(20, 240)
        end = SessionEnd(session_id=sid, frames_due=count, t_end_ns=start + count * 16 * MS)
        for copy in range(rng.choice([1, 1, 2])):  # after the session's truths (same producer)
            events.append((start + count * 16 * MS + 60 * MS + copy * WIN, "", end))
        for f in range(count):
            rtp = (origin + 1500 * f) % 2**32
            t = start + f * 16 * MS
            if rng.random() < 0.05:  # skipped by the simulator: never sent, never reported
                ns = NotSent(session_id=sid, frame=f, rtp_ts=rtp, t_due_ns=t, reason="late")
                not_sent[(sid, rtp)] = ns
                events.append((t + rng.randrange(50 * MS), rng.random().hex(), ns))
                continue
            detected = rng.random() < 0.8
            fr = _Frame(
                Truth(session_id=sid, frame=f, rtp_ts=rtp, x=rng.uniform(0, 640),
                      y=rng.uniform(0, 480), t_render_ns=t),
                Centroid(session_id=sid, rtp_ts=rtp, detected=detected,
                         x=rng.uniform(0, 640) if detected else None,
                         y=rng.uniform(0, 480) if detected else None,
                         t_router_recv_ns=t, t_published_ns=t),
            )  # fmt: skip
            frames[(sid, rtp)] = fr
            copies: list[tuple[Truth | Centroid, float, int]] = [
                (fr.truth, 0.95, 50 * MS),  # usually there, promptly
                (fr.truth, 0.05, 3 * WIN),  # a redelivered copy, any time
                (fr.report, 0.75, 300 * MS),
                (fr.report, 0.10, 3 * WIN),  # late, often too late
                (fr.report, 0.05, 3 * WIN),
            ]
            for copy_msg, p, spread in copies:
                if rng.random() < p:
                    events.append((t + rng.randrange(spread), rng.random().hex(), copy_msg))
    events.sort(key=lambda e: (e[0], e[1]))
    tokens_in = [("msg", n) for n in range(len(events))]

    cut = rng.randrange(len(events) // 3, len(events))
    joiners = [
        Joiner(window_ns=WIN, max_pending=60, max_sessions=6, finalised_ttl_ns=10**15),
        Joiner(window_ns=WIN, max_pending=60, max_sessions=6, finalised_ttl_ns=10**15),
    ]
    acked: list[object] = []
    rows: list[list[Result]] = [[], []]
    replay: list[Unjoined] = []
    fed: dict[str, set[int]] = {}  # frames (truth or not sent) taken so far, by session
    ended: Counter[str] = Counter()

    def run(i: int, batch: Batch) -> None:
        acked.extend(batch.ack_tokens())
        rows[i].extend(batch.results)
        for e in batch.ended:
            # Answered only once every frame of its session taken so far has its row.
            sid = e.message.session_id
            have = {r.rtp_ts for r in rows[0] + rows[1] if r.session_id == sid}
            assert fed.get(sid, set()) <= have
            ended[sid] += 1

    def taken(msg: Msg) -> None:
        if isinstance(msg, Truth | NotSent):
            fed.setdefault(msg.session_id, set()).add(msg.rtp_ts)

    truths_fed: list[set[tuple[str, int]]] = [set(), set()]
    for n, (t, _, msg) in enumerate(events[:cut]):
        taken(msg)
        if isinstance(msg, Truth | NotSent):
            truths_fed[0].add((msg.session_id, msg.rtp_ts))
        run(0, _feed(joiners[0], msg, t, tokens_in[n]))
        if rng.random() < 0.05:
            run(0, joiners[0].expire(t + rng.randrange(WIN)))
    restart = events[cut - 1][0] + rng.randrange(WIN // 2)
    shutdown = joiners[0].flush_all(restart)
    run(0, shutdown)
    replay = shutdown.unjoined
    _check_counters(joiners[0], replay)
    # The broker redelivers what was never acked, then the rest of the stream.
    for u in replay:
        run(1, _feed(joiners[1], u.message, restart, u.token))
    for n, (t, _, msg) in enumerate(events[cut:], start=cut):
        taken(msg)
        run(1, _feed(joiners[1], msg, max(t, restart), tokens_in[n]))
    for u in replay:
        if isinstance(u.message, Truth):
            truths_fed[1].add((u.message.session_id, u.message.rtp_ts))
    for _, _, msg in events[cut:]:
        if isinstance(msg, Truth | NotSent):
            truths_fed[1].add((msg.session_id, msg.rtp_ts))
    final = joiners[1].flush_all(events[-1][0] + 2 * WIN)
    run(1, final)
    assert final.unjoined == []
    _check_counters(joiners[1], [])

    assert Counter(acked) == Counter(tokens_in)  # every message acknowledged exactly once
    for i in (0, 1):
        # Within one tracker's memory a frame gets one row (orphans are reports, not frames).
        frames_rows = [(r.session_id, r.rtp_ts) for r in rows[i] if r.status != "orphan"]
        assert len(set(frames_rows)) == len(frames_rows)
        # ... and every truth it took got one, unless handed back unjoined for the next tracker.
        handed_back = (
            {
                (u.message.session_id, u.message.rtp_ts)
                for u in replay
                if not isinstance(u.message, SessionEnd)
            }
            if i == 0
            else set()
        )
        assert truths_fed[i] <= set(frames_rows) | handed_back
        c = joiners[i].counters()
        assert len(rows[i]) == (
            c["joined_ok"] + c["not_detected"] + c["missed"] + c["not_sent"] + c["orphans"]
        )
    # Every session's end is answered (at least once: a redelivered end may be answered again).
    assert set(ended) == {f"s{s}" for s in range(8)}
    for r in rows[0] + rows[1]:
        if (r.session_id, r.rtp_ts) in not_sent:
            ns = not_sent[(r.session_id, r.rtp_ts)]
            assert (r.status, r.frame, r.reason, r.t_render_ns) == (
                "not_sent",
                ns.frame,
                "late",
                ns.t_due_ns,
            )
            continue
        fr = frames[(r.session_id, r.rtp_ts)]
        if r.status == "ok":
            assert fr.report.x is not None and fr.report.y is not None
            assert r.l2 == math.hypot(fr.report.x - fr.truth.x, fr.report.y - fr.truth.y)
            assert (r.frame, r.truth_x) == (fr.truth.frame, fr.truth.x)
        else:
            assert r.l2 is None
        assert (r.status == "not_detected") <= (not fr.report.detected)


def not_sent(rtp: int, *, sid: str = "s1", frame: int = 8) -> NotSent:
    return NotSent(session_id=sid, frame=frame, rtp_ts=rtp, t_due_ns=T0 - 40 * MS, reason="late")


def test_a_frame_not_sent_gets_its_row_at_once_and_only_once() -> None:
    j = Joiner(window_ns=WIN)
    r = one(j.add_not_sent(not_sent(3000), T0, "n"))
    assert (r.status, r.frame, r.reason, r.tokens) == ("not_sent", 8, "late", ("n",))
    assert r.t_render_ns == T0 - 40 * MS and r.truth_x is None and r.l2 is None
    err = r.to_error_result()
    assert err is not None and schemas.validate(err) == err and err.status == "not_sent"
    again = j.add_not_sent(not_sent(3000), T0 + MS, "n2")  # a redelivery: no second row
    assert (again.results, again.acks) == ([], ["n2"])
    stray = j.add_report(report(3000), T0 + 2 * MS, "r")  # cannot happen, must not make a row
    assert (stray.results, stray.acks) == ([], ["r"])
    c = j.counters()
    assert (c["not_sent"], c["duplicate_truth"], c["late_reports"]) == (1, 1, 1)


def test_session_end_is_answered_after_the_last_frame_has_its_row() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_truth(truth(100), T0, "t1"))
    end = SessionEnd(session_id="s1", frames_due=9, t_end_ns=T0, reason="connect timeout")
    b = j.add_end(end, T0 + MS, "e")
    assert b == Batch()  # frame 100 still waits for its report
    quiet(j.add_truth(truth(200, sid="s2"), T0 + MS, "other"))  # another session: no effect
    b = j.add_report(report(100), T0 + 2 * MS, "r1")
    (r,) = b.results
    (e,) = b.ended
    assert r.status == "ok" and e.token == "e"
    assert (e.message.session_id, e.message.frames_due) == ("s1", 9)
    assert e.message.reason == "connect timeout"  # the simulator's reason, for the client
    assert b.ack_tokens() == ["t1", "r1", "e"]
    assert j.counters()["sessions_ended"] == 1


def test_session_end_waits_out_the_window_of_a_missed_frame() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_truth(truth(100), T0, "t1"))
    assert j.add_end(SessionEnd(session_id="s1", frames_due=1, t_end_ns=T0), T0, "e").ended == []
    b = j.expire(T0 + WIN)
    assert [r.status for r in b.results] == ["missed"] and b.results[0].reason == "no_report"
    assert [e.token for e in b.ended] == ["e"]


def test_session_end_with_nothing_waiting_is_answered_at_once() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_truth(truth(100), T0, "t1"))
    one(j.add_report(report(100), T0 + MS, "r1"))
    b = j.add_end(SessionEnd(session_id="s1", frames_due=1, t_end_ns=T0), T0 + 2 * MS, "e")
    assert [e.token for e in b.ended] == ["e"] and b.results == []


def test_an_end_still_pending_at_shutdown_is_handed_back_unjoined() -> None:
    j = Joiner(window_ns=WIN)
    quiet(j.add_truth(truth(100), T0, "t1"))
    end = SessionEnd(session_id="s1", frames_due=1, t_end_ns=T0)
    quiet(j.add_end(end, T0, "e"))
    b = j.flush_all(T0 + MS)
    assert [u.token for u in b.unjoined] == ["t1", "e"] and b.ended == []
    assert b.unjoined[1].message == end and j.counters()["ends_pending"] == 0


@pytest.mark.parametrize("seed", range(6))
def test_add_many_is_the_calls_one_by_one_at_the_same_time(seed: int) -> None:
    """``add_many`` over a receive's worth of messages = one call per message at the same
    ``now_ns``: the same results, acks and ends in the same order, the same counters, through
    windows running out, duplicates, late partners, frames not sent, ends, caps and a held clock."""
    rng = random.Random(seed)
    msgs: list[Truth | Centroid | NotSent | SessionEnd] = []
    for f in range(400):
        sid = f"s{rng.randrange(5)}"
        rtp = rng.randrange(60) * 1500
        pick = rng.random()
        if pick < 0.4:
            msgs.append(truth(rtp, sid=sid, frame=f))
        elif pick < 0.85:
            msgs.append(report(rtp, sid=sid, x=None if rng.random() < 0.2 else 103.0))
        elif pick < 0.95:
            msgs.append(NotSent(session_id=sid, frame=f, rtp_ts=rtp, t_due_ns=T0, reason="late"))
        else:
            msgs.append(SessionEnd(session_id=sid, frames_due=f, t_end_ns=T0))

    def make() -> Joiner:
        return Joiner(window_ns=WIN, max_sessions=3, max_pending=8, finalised_ttl_ns=5 * WIN)

    one, many = make(), make()
    now, i = T0, 0
    while i < len(msgs):
        group = msgs[i : i + rng.randrange(1, 40)]
        now += rng.randrange(0, WIN)
        limit = rng.choice([None, now - rng.randrange(WIN)])
        one.hold_clock(limit)
        many.hold_clock(limit)
        items = [(m, ("tok", i + k), now - 5 * MS, now - rng.randrange(3 * WIN))
                 for k, m in enumerate(group)]  # fmt: skip
        expected = Batch()
        for m, token, consumed, event in items:
            if isinstance(m, Truth):
                b = one.add_truth(m, now, token, consumed_ns=consumed, event_ns=event)
            elif isinstance(m, Centroid):
                b = one.add_report(m, now, token, consumed_ns=consumed, event_ns=event)
            elif isinstance(m, NotSent):
                b = one.add_not_sent(m, now, token)
            else:
                b = one.add_end(m, now, token)
            expected.results += b.results
            expected.acks += b.acks
            expected.ended += b.ended
        assert many.add_many(items, now) == expected
        i += len(group)
    assert many.counters() == one.counters()
    assert many.flush_all(now + WIN) == one.flush_all(now + WIN)
