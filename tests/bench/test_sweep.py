"""bench/sweep.py's pure parts: each axis's profile, the freezes counted from a CSV's rows, the
table and the plot. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import sweep
from carom.impairment import PROFILES
from carom.impairment import Path as NetPath
from carom_tracker import csvrow

MS = 1_000_000


def _row(sid: str, frame: int, recv_ms: float | None) -> csvrow.Row:
    t = None if recv_ms is None else int(recv_ms * MS)
    return csvrow.Row(
        session_id=sid, frame=frame, rtp_ts=frame * 3000, status="ok" if t else "missed",
        truth_x=0.0, truth_y=0.0, x=None, y=None, l2=None, t_render_ns=0, t_browser_recv_ns=t,
        t_browser_analysed_ns=None, t_router_recv_ns=None, t_published_ns=None,
        t_tracker_consumed_ns=None, t_computed_ns=None, reason="", clock_error_ns=None,
        latency="smooth", phase=0, latencies_ms={},
    )  # fmt: skip


def test_each_axis_moves_one_field_from_a_clear_path() -> None:
    assert sweep.path_for("delay", 100) == NetPath(delay_ms=100)
    assert sweep.path_for("jitter", 10) == NetPath(delay_ms=50, jitter_ms=10)
    assert sweep.path_for("loss", 2) == NetPath(loss_pct=2)
    assert sweep.path_for("rate", 500) == NetPath(rate_kbps=500)
    assert sweep.path_for("rate", 0).is_clear  # 0: no cap
    media = sweep.profile_for("loss", 5, "media")
    assert media.media.loss_pct == 5 and media.reports.is_clear and media.results.is_clear
    every = sweep.profile_for("delay", 25, "all")
    assert every.media == every.reports == every.results == NetPath(delay_ms=25)
    with pytest.raises(ValueError, match="no axis 'bogus'"):
        sweep.path_for("bogus", 1)
    # A named profile is itself, on its own paths; each axis's clear point is shared but jitter's.
    assert sweep.profile_for("profile", "satellite", "media") == PROFILES["satellite"]
    assert sweep.is_clear("delay", 0) and sweep.is_clear("profile", "clear")
    assert not sweep.is_clear("jitter", 0) and not sweep.is_clear("profile", "lte")


def test_freezes_are_gaps_of_more_than_three_frames_per_session() -> None:
    # 30 fps: 33.3 ms apart; a 200 ms gap is a freeze (frozen 200 - 33.3 ms), 100 ms is not.
    a = [_row("a", i, t) for i, t in enumerate([0, 33.3, 66.7, 266.7, 300, 400])]
    b = [_row("b", 0, 1000.0), _row("b", 1, None), _row("b", 2, 1050.0)]  # no receive: skipped
    count, frozen_s = sweep.freezes([*a, *b], fps=30)
    assert count == 1
    assert frozen_s == pytest.approx(0.2 - 1 / 30, abs=1e-6)


def test_the_table_and_the_plot_are_written(tmp_path: Path) -> None:
    hops = {h: {"p50": 10.0 + i, "p99": 20.0 + i, "n": 100} for i, h in enumerate(sweep.HOPS)}
    points = [
        {"axis": axis, "value": v, "fps": fps, "bitrate": bitrate, "frames": 300, "kept": 0.99,
         "missed": 3, "l2_mean_px": 0.01, "freezes": 0, "frozen_s": 0.0, "latency_ms": hops,
         "sent_kbps": 900.0, "nacks": 12, "retransmitted": 30, "keyframe_requests": 1,
         "browser": {"jitter_buffer_ms_median": 12.5, "received_kbps": 880.0, "freeze_count": 2}}
        for fps, bitrate in ((30, 0), (60, 500_000))
        for axis in ("delay", "loss", "profile") for v in sweep.AXES[axis][1]
    ]  # fmt: skip
    text = sweep.table(points)
    assert text.count("\n") == len(points) + 1
    assert (
        "| 30 | auto | delay | 200 | 300 | 99.0% | 3 | 0.01 | 0 (0.00) | 900 | 12 / 30 / 1 |"
        in text
    )
    assert "| 60 | 500 | profile | satellite |" in text and "| 12.5 | 880 | 2 |" in text
    sweep.plot(points, tmp_path / "s.png", "test")
    assert (tmp_path / "s.png").stat().st_size > 10_000
