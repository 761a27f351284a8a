"""Pacing: receive alignment, caught-up and the join clock's limit, every time passed in."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from carom_tracker.pacing import RECOVERY_SILENCE_S, SILENCE_S, Pacing, recovery_silence

TRUTH, CENTROIDS = 0, 1
T0 = 1000.0  # monotonic seconds at start
MS = 1_795_000_000_000  # an epoch time in ms
WINDOW_S = 2.0  # lead 500 ms


def busy(window_s: float = WINDOW_S) -> Pacing:
    """Both topics have received something and are busy."""
    p = Pacing(window_s, T0)
    p.received(TRUTH, T0, {-1: (1, 0)}, MS)
    p.received(CENTROIDS, T0, {-1: (1, 0)}, MS)
    return p


# -- holding a batch ----------------------------------------------------------------------------


def test_nothing_holds_at_start_when_both_are_level() -> None:
    p = busy()
    assert p.lead_ms == 500
    assert not p.must_hold(TRUTH, MS) and not p.must_hold(CENTROIDS, MS)


def test_a_batch_ahead_by_more_than_the_lead_holds() -> None:
    p = busy()
    assert not p.must_hold(TRUTH, MS + 500)  # exactly the lead: goes
    assert p.must_hold(TRUTH, MS + 501)
    # The other moves within the lead: released.
    p.received(CENTROIDS, T0 + 0.1, {-1: (1, 5)}, MS + 1)
    assert not p.must_hold(TRUTH, MS + 501)


def test_an_idle_other_topic_never_holds() -> None:
    p = busy()
    assert p.must_hold(TRUTH, MS + 10_000)
    p.went_idle(CENTROIDS)
    assert not p.must_hold(TRUTH, MS + 10_000)
    p.received(CENTROIDS, T0 + 1, {-1: (1, 1)}, MS)  # busy again: holds again
    assert p.must_hold(TRUTH, MS + 10_000)


def test_a_topic_that_received_nothing_yet_holds_the_other() -> None:
    """At start neither topic is idle (unknown): a backlog on one waits for the other's first."""
    p = Pacing(WINDOW_S, T0)
    p.received(TRUTH, T0, {-1: (1, 0)}, MS)
    assert p.must_hold(TRUTH, MS)


def test_marks_never_go_backwards() -> None:
    """A batch whose newest stream time is older (a spooled message, a clock step) moves nothing."""
    p = busy()
    p.received(CENTROIDS, T0, {-1: (1, 1)}, MS + 2000)
    p.received(CENTROIDS, T0, {-1: (1, 2)}, MS - 60_000)
    assert p.marks[CENTROIDS] == MS + 2000
    assert not p.must_hold(TRUTH, MS + 2500)


def test_both_topics_never_hold_at_once() -> None:
    rng = random.Random(15)
    for window_s in (0.1, 0.5, 2.0, 10.0):
        p = busy(window_s)
        for _ in range(2000):
            t, m = rng.choice((TRUTH, CENTROIDS)), MS + rng.randint(-30_000, 30_000)
            p.received(t, T0, {-1: (1, 0)}, m)
            for a, b in itertools.product(range(-5000, 5001, 2500), repeat=2):
                # Each batch's oldest is at most its topic's mark (the batch already received).
                oldest_t, oldest_c = p.marks[TRUTH] + min(a, 0), p.marks[CENTROIDS] + min(b, 0)
                assert not (p.must_hold(TRUTH, oldest_t) and p.must_hold(CENTROIDS, oldest_c))


def test_a_burst_keeps_only_the_newest_mark() -> None:
    p = busy()
    for n in range(10_000):
        p.received(TRUTH, T0 + n * 1e-4, {-1: (2, n)}, MS + n)
        p.handed(TRUTH)
    assert (p.marks[TRUTH], p.put[TRUTH], p.last_id[TRUTH]) == (MS + 9999, 10_000, {-1: (2, 9999)})


# -- caught up ----------------------------------------------------------------------------------


def test_the_silence_is_at_least_a_window_and_two_seconds() -> None:
    assert Pacing(0.1, T0).silence_s == SILENCE_S
    assert Pacing(5.0, T0).silence_s == 5.0


def test_caught_up_when_the_broker_last_message_came() -> None:
    p = busy()
    p.received(TRUTH, T0 + 1, {-1: (7, 41)}, MS)
    now = T0 + 1.01  # not silent
    assert not p.caught_up(TRUTH, now, {-1: (7, 42)})
    assert p.caught_up(TRUTH, now, {-1: (7, 41)})
    assert p.caught_up(TRUTH, now, {-1: (6, 900)})  # an older ledger
    assert not p.caught_up(TRUTH, now, {-1: (8, 0)})  # a newer ledger


def test_a_partitioned_topic_is_caught_up_when_every_partition_is() -> None:
    """Ids are ordered within a partition only: each partition is compared on its own."""
    p = Pacing(WINDOW_S, T0)
    p.received(TRUTH, T0 + 1, {0: (7, 41), 2: (9, 3)}, MS)
    p.received(TRUTH, T0 + 1, {1: (8, 5)}, MS + 1)  # another batch, another partition
    now = T0 + 1.01  # not silent
    assert p.last_id[TRUTH] == {0: (7, 41), 1: (8, 5), 2: (9, 3)}
    assert p.caught_up(TRUTH, now, {0: (7, 41), 1: (8, 5), 2: (9, 3), 3: (10, -1)})
    assert not p.caught_up(TRUTH, now, {0: (7, 41), 1: (8, 6), 2: (9, 3)})  # one behind
    assert not p.caught_up(TRUTH, now, {0: (7, 41), 1: (8, 5), 3: (10, 0)})  # one never seen
    # A partition's older id never stands in for another partition's newer one.
    assert not p.caught_up(TRUTH, now, {0: (9, 9), 2: (7, 41)})


def test_an_empty_topic_is_caught_up() -> None:
    p = Pacing(WINDOW_S, T0)
    assert p.caught_up(TRUTH, T0, {-1: (-1, -1)})
    assert p.caught_up(TRUTH, T0, {-1: (3, -1)})


def test_silence_counts_when_the_last_message_never_comes_here() -> None:
    """With replicas the broker's last message may be another replica's key."""
    p = busy()
    assert p.last_id[CENTROIDS] == {-1: (1, 0)}
    assert not p.caught_up(CENTROIDS, T0 + SILENCE_S - 0.001, {-1: (9, 9)})
    assert p.caught_up(CENTROIDS, T0 + SILENCE_S, {-1: (9, 9)})


def test_silence_counts_from_the_start_before_any_message() -> None:
    p = Pacing(WINDOW_S, T0)
    assert not p.caught_up(TRUTH, T0 + 1.0, {-1: (4, 4)})
    assert p.caught_up(TRUTH, T0 + 2.0, {-1: (4, 4)})


def test_a_clock_going_backwards_is_not_silence() -> None:
    p = busy()
    assert not p.caught_up(TRUTH, T0 - 3600.0, {-1: (9, 9)})
    assert not p.caught_up(TRUTH, T0 - 3600.0, None)


@pytest.mark.parametrize(
    ("outage_s", "expected"),
    [(0.0, 5.0), (1.0, 5.0), (5.0, 5.0), (30.0, 30.0), (75.0, 75.0), (600.0, 75.0)],
)
def test_recovery_silence_is_the_outage_within_bounds(outage_s: float, expected: float) -> None:
    assert recovery_silence(outage_s) == expected
    assert RECOVERY_SILENCE_S[0] <= recovery_silence(outage_s) <= RECOVERY_SILENCE_S[1]


def test_link_down_then_back_only_silence_counts_for_a_while() -> None:
    p = busy()
    p.received(TRUTH, T0 + 1, {-1: (7, 41)}, MS)
    p.went_idle(TRUTH)
    p.went_idle(CENTROIDS)
    p.link_changed(False, 0.0, T0 + 2)
    assert p.idle == [False, False]
    assert p.recovering(T0 + 1e9) and p.recover_until == math.inf
    back = T0 + 32
    p.link_changed(True, 30.0, back)
    assert (p.silence_s, p.recover_until, p.last_rx) == (30.0, back + 30.0, [back, back])
    assert p.recovering(back + 29.9) and not p.recovering(back + 30.0)
    # Recovering: the broker's answer is ignored, even one that says caught up.
    assert not p.caught_up(TRUTH, back + 1, {-1: (7, 41)})
    assert not p.caught_up(TRUTH, back + 1, {-1: (-1, -1)})
    assert p.caught_up(TRUTH, back + 29.9, None) is False
    # After the recovery window: the broker's answer counts again, and so does the usual
    # silence (the last message may be another replica's key): not the outage's any more.
    assert p.caught_up(TRUTH, back + 30, {-1: (7, 41)})
    p.received(TRUTH, back + 31, {-1: (7, 42)}, MS + 1)
    assert not p.caught_up(TRUTH, back + 31 + p.base_silence_s - 0.1, {-1: (7, 50)})
    assert p.caught_up(TRUTH, back + 31 + p.base_silence_s, {-1: (7, 50)})
    assert p.base_silence_s < 30.0


def test_a_short_outage_still_waits_the_lower_bound() -> None:
    p = busy(0.1)
    p.link_changed(True, 0.5, T0 + 10)
    assert (p.silence_s, p.recover_until) == (5.0, T0 + 15)
    assert not p.caught_up(TRUTH, T0 + 14.9, {-1: (1, 0)})
    assert p.caught_up(TRUTH, T0 + 15.0, {-1: (1, 0)})


def test_not_asked_means_silence_only() -> None:
    p = busy()
    assert not p.caught_up(TRUTH, T0 + 1, None)
    assert p.caught_up(TRUTH, T0 + SILENCE_S, None)


# -- the join clock -----------------------------------------------------------------------------


def test_no_limit_before_anything_is_joined() -> None:
    assert Pacing(WINDOW_S, T0).clock_limit(T0) is None
    assert busy().clock_limit(T0) is None  # received, but nothing joined yet


def test_the_limit_is_the_slowest_busy_topic() -> None:
    p = busy()
    p.joining(TRUTH, MS + 10)
    assert p.clock_limit(T0) == (MS + 10) * 1_000_000
    p.joined(TRUTH, MS + 40)
    p.joining(CENTROIDS, MS + 20)
    assert p.clock_limit(T0) == (MS + 20) * 1_000_000
    p.joined(CENTROIDS, MS + 90)
    assert p.clock_limit(T0) == (MS + 40) * 1_000_000


def test_a_partial_outage_holds_the_clock_where_the_link_was_lost_until_recovered() -> None:
    """One broker of a cluster lost: the topics' other partitions keep their marks moving, but
    nothing may be given up on while the lost partitions' messages wait in their producers."""
    p = busy()
    p.joined(TRUTH, MS + 40)
    p.joined(CENTROIDS, MS + 30)
    p.link_changed(False, 0.0, T0 + 1)
    assert p.frozen_ms == MS + 30
    # The live partitions go on: without the freeze the limit would follow them.
    p.joined(TRUTH, MS + 5_000)
    p.joined(CENTROIDS, MS + 5_000)
    assert p.clock_limit(T0 + 5) == (MS + 30) * 1_000_000
    p.link_changed(False, 0.0, T0 + 6)  # lost again while down: the first freeze stays
    assert p.frozen_ms == MS + 30
    p.link_changed(True, 10.0, T0 + 11)  # back after 10 s: recovery for 10 s more
    assert p.clock_limit(T0 + 20.9) == (MS + 30) * 1_000_000
    assert p.clock_limit(T0 + 21) == (MS + 5_000) * 1_000_000  # recovered: streams again
    assert p.frozen_ms is None


def test_an_outage_before_anything_was_joined_freezes_nothing() -> None:
    p = busy()
    p.link_changed(False, 0.0, T0 + 1)
    assert p.frozen_ms is None and p.clock_limit(T0 + 2) is None


def test_while_a_batch_is_joined_the_clock_stays_at_its_oldest() -> None:
    p = busy()
    p.joined(TRUTH, MS + 100)
    p.joining(TRUTH, MS + 50)  # an older batch (stream time went back): the mark stays
    assert p.joined_ms[TRUTH] == MS + 100
    p.joining(TRUTH, MS + 200)
    assert p.clock_limit(T0) == (MS + 200) * 1_000_000
    p.joined(TRUTH, MS + 150)  # newest below the oldest: still never backwards
    assert (p.done[TRUTH], p.joined_ms[TRUTH]) == (2, MS + 200)


def test_an_idle_topic_sets_no_limit_only_once_all_its_batches_are_joined() -> None:
    p = busy()
    for _ in range(3):
        p.handed(TRUTH)
    p.joined(TRUTH, MS + 5)
    p.went_idle(TRUTH)
    assert p.clock_limit(T0) == (MS + 5) * 1_000_000  # 1 of 3 batches joined
    p.joined(TRUTH, MS + 6)
    p.joined(TRUTH, MS + 7)
    assert p.clock_limit(T0) is None  # idle and every batch joined: live, the wall clock runs
    p.joined(CENTROIDS, MS + 3)
    assert p.clock_limit(T0) == (MS + 3) * 1_000_000
    p.went_idle(CENTROIDS)
    assert p.clock_limit(T0) == (MS + 3) * 1_000_000  # handed none but joined one: not equal
    p.handed(CENTROIDS)
    assert p.clock_limit(T0) is None


def test_the_link_going_down_holds_the_clock_again() -> None:
    p = busy()
    p.handed(TRUTH)
    p.joined(TRUTH, MS + 5)
    p.went_idle(TRUTH)
    assert p.clock_limit(T0) is None
    p.link_changed(False, 0.0, T0 + 1)
    assert p.clock_limit(T0) == (MS + 5) * 1_000_000


# -- status -------------------------------------------------------------------------------------


def test_behind_is_the_busiest_busy_topic() -> None:
    p = Pacing(WINDOW_S, T0)
    assert p.behind_ms(MS) == 0  # nothing received
    p.received(TRUTH, T0, {-1: (1, 0)}, MS - 300)
    p.received(CENTROIDS, T0, {-1: (1, 0)}, MS - 100)
    assert p.behind_ms(MS) == 300
    p.went_idle(TRUTH)
    assert p.behind_ms(MS) == 100
    p.went_idle(CENTROIDS)
    assert p.behind_ms(MS) == 0


def test_behind_is_never_negative() -> None:
    """A producer's clock ahead of ours (or ours stepping back) says 0, not a negative lag."""
    p = Pacing(WINDOW_S, T0)
    p.received(TRUTH, T0, {-1: (1, 0)}, MS + 5000)
    assert p.behind_ms(MS) == 0
