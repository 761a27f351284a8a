"""The frame schedule: due times, skipping late frames, the start-up grace, release lag."""

from __future__ import annotations

import pytest

from carom_simulator.timeline import RTP_CLOCK_RATE, Due, Timeline


def test_frames_are_due_at_start_plus_n_over_fps() -> None:
    t = Timeline(30.0)
    assert t.due(100.0) == Due(0, 100.0, range(0))
    t.handed(0, 100.0, 100.001)
    # Asked again at once: frame 1 is due a frame later, nothing skipped.
    assert t.due(100.002) == Due(1, 100.0 + 1 / 30, range(1, 1))
    assert t.next == 1


def test_a_request_exactly_on_a_due_time_gets_that_frame() -> None:
    t = Timeline(30.0)
    t.due(0.0)
    t.handed(0, 0.0, 0.0)
    # 10/30 is not exact in binary: the slack must not round frame 10 down to 9 (and skip it
    # on the next call) nor up past it.
    d = t.due(10 / 30)
    assert d.index == 10 and list(d.skipped) == list(range(1, 10))


def test_late_requests_skip_the_frames_whose_time_passed() -> None:
    t = Timeline(60.0)
    t.due(0.0)
    t.handed(0, 0.0, 0.0)
    d = t.due(0.1)  # 6 frame times later: frames 1-5 are gone, frame 6 is due now
    assert (d.index, list(d.skipped)) == (6, [1, 2, 3, 4, 5])
    assert d.at == pytest.approx(0.1)
    assert t.late_dropped == 5 and t.next == 6
    t.handed(6, d.at, 0.1)
    assert t.sent == 2


def test_the_start_up_grace_moves_the_timeline_instead_of_skipping() -> None:
    t = Timeline(30.0, startup_grace_s=0.5)  # 15 frames of grace
    assert t.grace_frames == 15
    t.due(0.0)
    t.handed(0, 0.0, 0.0)
    d = t.due(0.4)  # the cold pipeline held frame 1 back by 12 frame times
    assert d.index == 1 and not d.skipped and d.at == pytest.approx(0.4)
    assert t.start == pytest.approx(0.4 - 1 / 30) and t.late_dropped == 0
    # Past the grace, lateness skips again.
    t.next = 15
    d = t.due(t.due_at(15) + 0.2)
    assert d.index == 21 and list(d.skipped) == list(range(15, 21))


def test_release_lag_is_measured_from_the_due_time() -> None:
    t = Timeline(10.0)
    assert (t.lag_ms_mean, t.lag_ms_max) == (0.0, 0.0)
    d = t.due(5.0)
    t.handed(d.index, d.at, 5.004)  # 4 ms after it was due
    d = t.due(5.05)  # early: frame 1 is due at 5.1
    t.handed(d.index, d.at, 5.09)  # handed before its time (the sleep woke early): no lag
    assert t.lag_ms_mean == pytest.approx(2.0) and t.lag_ms_max == pytest.approx(4.0)


def test_pts_count_90_khz_ticks_from_frame_zero() -> None:
    assert RTP_CLOCK_RATE == 90_000
    assert [Timeline(30.0).pts_of(n) for n in (0, 1, 30)] == [0, 3000, 90_000]
    assert Timeline(29.97).pts_of(1) == 3003  # rounded to a whole tick


def test_due_times_need_a_start_and_fps_must_be_positive() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        Timeline(30.0).due_at(1)
    for fps in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps"):
            Timeline(fps)


def test_a_rate_change_keeps_the_next_frames_due_time_and_pts() -> None:
    t = Timeline(30.0)
    t.due(0.0)
    t.handed(0, 0.0, 0.0)
    d = t.due(1 / 30)
    t.handed(d.index, d.at, d.at)  # frames 0-1 at 30 fps; frame 2 is due at 2/30, pts 6000
    at2, pts2 = t.due_at(2), t.pts_of(2)
    t.rebase(60.0, None)
    assert (t.first, t.pts_of(2)) == (2, pts2) and t.due_at(2) == pytest.approx(at2)
    assert t.due_at(3) == pytest.approx(at2 + 1 / 60) and t.pts_of(3) == pts2 + 1500
    # Late by 3 frame times of the new rate: those are skipped on the new schedule.
    d = t.due(at2 + 3 / 60)
    assert (d.index, list(d.skipped)) == (5, [2, 3, 4])


def test_a_resume_starts_a_segment_now_with_pts_on_the_clock_and_no_gap() -> None:
    t = Timeline(30.0)
    t.due(10.0)
    t.handed(0, 10.0, 10.0)
    # Stopped after frame 0; resumed 5 s later: frame 1 is due then, its pts 5 s of ticks on.
    t.rebase(30.0, 15.0, grace_s=0.5)
    d = t.due(15.0)
    assert (d.index, d.at, list(d.skipped)) == (1, 15.0, [])
    assert t.pts_of(1) == 5 * RTP_CLOCK_RATE and t.pts_of(2) == 5 * RTP_CLOCK_RATE + 3000
    t.handed(1, 15.0, 15.0)
    # The resumed stream's encoder cold-starts: its first frames get the grace, not skips.
    d = t.due(15.3)
    assert (d.index, list(d.skipped)) == (2, []) and t.grace_frames == 1 + 15
    with pytest.raises(ValueError, match="before the current one"):
        t.rebase(30.0, 14.0)


def test_a_rebase_before_the_first_frame_only_sets_the_rate() -> None:
    t = Timeline(30.0)
    t.rebase(60.0, None)
    assert t.due(0.0) == Due(0, 0.0, range(0)) and t.pts_of(1) == 1500
    with pytest.raises(ValueError, match="fps"):
        t.rebase(0.0, None)
