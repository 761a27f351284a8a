"""The one definition of frames due and coverage."""

from __future__ import annotations

import pytest

from carom.accounting import Coverage, count


def test_every_index_up_to_the_last_is_due_and_a_gap_is_no_row() -> None:
    c = count([(0, "ok"), (1, "not_sent"), (3, "missed"), (4, "ok"), (5, "not_detected")])
    assert c == Coverage(due=6, ok=2, not_detected=1, missed=1, not_sent=1)
    assert c.no_row == 1  # frame 2: nothing arrived, still counted
    assert c.fraction == pytest.approx(2 / 6)


def test_frames_due_given_by_the_session_end_counts_the_tail_too() -> None:
    c = count([(0, "ok"), (1, "ok")], frames_due=5)
    assert (c.due, c.ok, c.no_row) == (5, 2, 3)
    with pytest.raises(ValueError, match="beyond"):
        count([(7, "ok")], frames_due=5)


def test_a_frame_counted_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        count([(0, "ok"), (0, "missed")])


def test_sessions_add_up_and_the_line_says_everything() -> None:
    total = count([(0, "ok"), (1, "not_sent")]) + count([(0, "missed")], frames_due=2)
    assert total == Coverage(due=4, ok=1, missed=1, not_sent=1)
    assert total.line() == (
        "coverage 1/4 frames due ok (25.00%): 0 not detected, 1 missed, 1 not sent, 1 with no row"
    )
    assert Coverage(0).fraction == 0.0 and count([]).due == 0
