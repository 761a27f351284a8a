"""OriginLearner: the RTP origin inferred from a sender's packets, truth released in frame order."""

from __future__ import annotations

import pytest

from carom_simulator.origin import RTP_MOD, OriginLearner, PendingTruth, Stamped

STEP = 1500  # pts per frame at 60 fps, 90 kHz


def truth(frame: int, *, sent: bool = True) -> PendingTruth:
    return PendingTruth(frame, frame * STEP, float(frame), 2.0 * frame, 1000 + frame, sent=sent)


class Sender:
    """What aiortc's sender exposes: its packet count and the last packet's RTP timestamp."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.packets = 0
        self.rtp_ts = 0

    def send(self, pts: int, packets: int = 3, origin: int | None = None) -> None:
        base = self.origin if origin is None else origin
        self.rtp_ts = (base + pts) % RTP_MOD
        self.packets += packets


def hand(learner: OriginLearner, sender: Sender | None, frame: int) -> list[Stamped]:
    """recv() returning frame ``frame``: hand-out, then its truth."""
    learner.handed(frame * STEP, None if sender is None else sender.packets)
    return learner.add(truth(frame))


def frames(learner: OriginLearner, sender: Sender, n: int) -> list[Stamped]:
    """``n`` frames as aiortc drives the track: observe, hand out, send; all that is released."""
    out: list[Stamped] = []
    for f in range(n):
        out += learner.observe(sender.packets, sender.rtp_ts)
        out += hand(learner, sender, f)
        sender.send(f * STEP)
    return out


def test_learns_after_two_agreeing_observations_and_releases_in_order() -> None:
    learner, sender = OriginLearner(), Sender(123_456)
    released = frames(learner, sender, 5)
    assert learner.origin == 123_456
    # Frames 0..2 waited; observation on entry to frame 2 was the second: they go out together.
    assert [s.truth.frame for s in released] == [0, 1, 2, 3, 4]
    assert all(s.rtp_ts == 123_456 + s.truth.pts for s in released)
    assert (learner.observations, learner.agreements, learner.mismatches) == (4, 2, 0)
    assert learner.pending == 0


def test_backlog_released_only_once_confirmed() -> None:
    learner, sender = OriginLearner(confirmations=3), Sender(7)
    out = []
    for f in range(3):
        out.append(learner.observe(sender.packets, sender.rtp_ts))
        out.append(hand(learner, sender, f))
        sender.send(f * STEP)
    assert all(o == [] for o in out) and learner.origin is None and learner.pending == 3
    released = learner.observe(sender.packets, sender.rtp_ts)  # the third observation
    assert [s.truth.frame for s in released] == [0, 1, 2] and learner.origin == 7


@pytest.mark.parametrize("origin", [0, 1, RTP_MOD - 4000, RTP_MOD - 1])
def test_origin_near_the_wrap(origin: int) -> None:
    """``(origin + pts)`` wraps past 2**32 within the first frames; the origin is still exact."""
    learner, sender = OriginLearner(), Sender(origin)
    released = frames(learner, sender, 8)
    assert learner.origin == origin
    assert [s.rtp_ts for s in released] == [(origin + f * STEP) % RTP_MOD for f in range(8)]
    assert all(0 <= s.rtp_ts < RTP_MOD for s in released)
    assert learner.mismatches == 0


def test_pts_beyond_the_wrap() -> None:
    """A session long enough for pts itself to pass 2**32 (13 h at 90 kHz) stamps modulo 2**32."""
    learner, sender = OriginLearner(confirmations=1), Sender(RTP_MOD - 10)
    pts = RTP_MOD + 5
    learner.handed(pts, sender.packets)
    sender.send(pts)
    learner.observe(sender.packets, sender.rtp_ts)
    assert learner.origin == RTP_MOD - 10
    (s,) = learner.add(PendingTruth(1, pts + STEP, 0.0, 0.0, 0))
    assert s.rtp_ts == (RTP_MOD - 10 + pts + STEP) % RTP_MOD


def test_no_packets_means_nothing_inferred() -> None:
    """A frame the sender never sent (disabled, no payload) cannot corrupt the origin."""
    learner, sender = OriginLearner(confirmations=1), Sender(500)
    hand(learner, sender, 0)
    sender.rtp_ts = 999_999  # a stale or bogus timestamp, no packet counted
    assert learner.observe(sender.packets, sender.rtp_ts) == []
    assert (learner.unsent, learner.observations, learner.origin) == (1, 0, None)


def test_observation_before_any_hand_out_is_ignored() -> None:
    learner = OriginLearner(confirmations=1)
    assert learner.observe(10, 12345) == []
    assert (learner.unsent, learner.observations, learner.origin) == (0, 0, None)


def test_hand_out_without_sender_keeps_the_last_count() -> None:
    """``packets=None`` (no sender attached yet) leaves the count of the last hand-out."""
    learner = OriginLearner(confirmations=1)
    learner.handed(0, 6)
    learner.handed(STEP, None)
    assert learner.observe(6, 42) == [] and learner.unsent == 1
    learner.observe(9, 100 + STEP)
    assert learner.origin == 100


def test_a_bogus_observation_does_not_move_the_origin_and_resets_nothing_known() -> None:
    learner, sender = OriginLearner(), Sender(1000)
    frames(learner, sender, 4)
    learner.observe(sender.packets, sender.rtp_ts)
    learner.handed(4 * STEP, sender.packets)
    sender.send(4 * STEP, origin=1007)
    assert learner.observe(sender.packets, sender.rtp_ts) == []
    assert (learner.origin, learner.mismatches, learner.changes) == (1000, 1, 0)


def test_a_new_origin_needs_consecutive_confirmations() -> None:
    """A mismatch, then an agreement: the half-confirmed candidate is forgotten."""
    learner = OriginLearner()
    obs = iter(range(1, 100))

    def step(pts: int, origin: int) -> None:
        packets = next(obs) * 3
        learner.handed(pts, packets - 3)
        learner.observe(packets, (origin + pts) % RTP_MOD)

    step(0, 10)
    step(STEP, 10)
    assert learner.origin == 10
    step(2 * STEP, 20)  # candidate 20, once
    step(3 * STEP, 10)  # agreement: candidate forgotten
    step(4 * STEP, 20)  # candidate 20, once again
    assert (learner.origin, learner.changes) == (10, 0)
    step(5 * STEP, 20)  # twice in a row: replaces
    assert (learner.origin, learner.changes) == (20, 1)
    assert (learner.mismatches, learner.agreements) == (3, 1)
    (s,) = learner.add(truth(6))
    assert s.rtp_ts == 20 + 6 * STEP


def test_alternating_candidates_never_confirm() -> None:
    learner = OriginLearner()
    for n in range(10):
        learner.handed(n * STEP, 3 * n)
        learner.observe(3 * n + 3, (100 + 50 * (n % 2) + n * STEP) % RTP_MOD)
    assert learner.origin is None and learner.observations == 10


def test_known_origin_stamps_at_once_including_not_sent() -> None:
    learner, sender = OriginLearner(confirmations=1), Sender(RTP_MOD - 1)
    frames(learner, sender, 2)
    (s,) = learner.add(truth(5, sent=False))
    assert s.truth.sent is False and s.rtp_ts == (RTP_MOD - 1 + 5 * STEP) % RTP_MOD


def test_backlog_is_bounded_oldest_first() -> None:
    learner = OriginLearner(confirmations=1, backlog=4)
    for f in range(10):  # a burst with no origin: only the newest 4 wait
        assert learner.add(truth(f)) == []
    assert (learner.pending, learner.overflow) == (4, 6)
    learner.handed(9 * STEP, 0)
    released = learner.observe(3, 77 + 9 * STEP)
    assert [s.truth.frame for s in released] == [6, 7, 8, 9] and learner.pending == 0


def test_abandon_counts_what_waits() -> None:
    learner = OriginLearner(backlog=8)
    for f in range(3):
        learner.add(truth(f))
    assert learner.abandon() == 3
    assert (learner.abandoned, learner.pending) == (3, 0)
    assert learner.abandon() == 0 and learner.abandoned == 3


def test_idle_sender_counts_every_repeat_as_unsent() -> None:
    learner, sender = OriginLearner(), Sender(5)
    frames(learner, sender, 3)
    for f in range(3, 8):  # the sender stops after frame 2: the count moves once more, then never
        learner.observe(sender.packets, sender.rtp_ts)
        hand(learner, sender, f)
    assert learner.unsent == 4 and learner.origin == 5 and learner.pending == 0


@pytest.mark.parametrize(("confirmations", "backlog"), [(0, 1), (1, 0), (-1, 5)])
def test_rejects_bad_limits(confirmations: int, backlog: int) -> None:
    with pytest.raises(ValueError):
        OriginLearner(confirmations, backlog)
