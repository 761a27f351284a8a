"""The report command on a generated CSV: figures printed, duplicates dropped, PNGs written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal, NamedTuple

import matplotlib.image as mpimg
import msgspec
import pytest
from msgspec.structs import replace

from carom import accounting, schemas
from carom_tracker.join import Joiner, Result
from carom_tracker.report import (
    Browser,
    browser,
    figures,
    load,
    main,
    phase_figures,
    render_phases,
)
from carom_tracker.sink import CsvSink

MS = 1_000_000
MODES = {"alpha": "smooth", "beta": "interactive"}


def generate(folder: Path) -> None:
    """Two sessions x 100 frames due: every 10th not detected, 4 missed and 3 not sent each,
    beta's frame 50 lost on the way (no row), one duplicate; alpha smooth, beta interactive."""
    j = Joiner(window_ns=50 * MS)
    sink = CsvSink(folder, lambda tokens: None)
    t0 = 1_700_000_000_000_000_000
    first: Result | None = None
    for f in range(100):
        now = t0 + f * 16 * MS
        for sid in ("alpha", "beta"):
            if sid == "beta" and f == 50:
                continue  # its truth never arrived: due, with no row
            if f % 30 == 29:
                ns = schemas.NotSent(session_id=sid, frame=f, rtp_ts=f * 1500, t_due_ns=now,
                                     reason="late", latency=MODES[sid])  # fmt: skip
                for r in j.add_not_sent(ns, now + 20 * MS).results:
                    sink.add(r)
                continue
            t = schemas.Truth(session_id=sid, frame=f, rtp_ts=f * 1500, x=100.0, y=100.0,
                              t_render_ns=now, latency=MODES[sid])  # fmt: skip
            batches = [j.add_truth(t, now + 20 * MS)]
            if f % 25 != 3:
                det = f % 10 != 0
                c = schemas.Centroid(
                    session_id=sid, rtp_ts=f * 1500, detected=det,
                    x=100.0 + f % 4 if det else None, y=100.0 if det else None,
                    t_browser_recv_ns=now + 10 * MS, t_browser_analysed_ns=now + 12 * MS,
                    t_router_recv_ns=now + 14 * MS, t_published_ns=now + 15 * MS,
                )  # fmt: skip
                batches.append(j.add_report(c, now + 21 * MS))
            for b in batches:
                for r in b.results:
                    sink.add(r)
                    first = first or r
    for r in j.expire(t0 + 10**10).results:
        sink.add(r)
    assert first is not None
    assert not sink.add(first)  # the sink itself refuses a redelivered frame
    sink.close()
    # ... but a CSV may still hold one (two trackers on one volume handing a session over)
    path = folder / f"{first.session_id}.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines, lines[1]]))


def test_report_prints_figures_and_writes_pngs(tmp_path: Path) -> None:
    run = tmp_path / "metrics" / "run1"
    generate(run)
    loaded = load(sorted(run.glob("*.csv")))
    assert (loaded.raw, loaded.duplicates, len(loaded.rows)) == (200, 1, 199)
    fig = figures(loaded.rows)
    cov = fig["coverage"]
    assert cov == accounting.Coverage(due=200, ok=166, not_detected=19, missed=8, not_sent=6)
    assert cov.no_row == 1 and fig["frames"] == 199
    assert fig["l2_max"] == 3.0
    hops = fig["latency_ms"]
    assert isinstance(hops, dict)
    assert hops["render_to_browser_ms"]["p50"] == 10.0
    assert hops["end_to_end_ms"]["p99"] == 14.0

    out = tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, "-m", "carom_tracker.report", "--metrics-dir", str(tmp_path / "metrics"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "1 duplicate(s)" in text
    assert (
        "session alpha: coverage 83/100 frames due ok (83.00%): 10 not detected, 4 missed, "
        "3 not sent, 0 with no row"
    ) in text
    assert "session beta: coverage 83/100 frames due ok (83.00%): 9 not detected" in text
    first = {line.split(":")[0]: line for line in text.splitlines() if ": coverage" in line}
    assert first["session alpha"].endswith("; latency smooth")
    assert first["session beta"].endswith("; latency interactive")
    # Modes are never read as one: a block per mode, and the overall line says it mixes them.
    assert "latency smooth: coverage 83/100 frames due ok" in text
    assert "latency interactive: coverage 83/100 frames due ok" in text
    assert (
        "overall: coverage 166/200 frames due ok (83.00%): 19 not detected, 8 missed, "
        "6 not sent, 1 with no row"
    ) in text
    assert first["overall"].endswith(
        "; latency interactive+smooth (MIXED: one block per mode above)"
    )
    assert "render_to_browser_ms" in text
    assert "p50    10.000" in text
    pngs = [Path(s.removeprefix("wrote ")) for s in text.splitlines() if s.startswith("wrote ")]
    assert sorted(p.name for p in pngs) == [
        "l2_over_time.png", "latency_over_time.png", "latency_per_hop.png",
    ]  # fmt: skip
    for p in pngs:
        img = mpimg.imread(p)
        assert img.shape[0] >= 300 and img.shape[1] >= 800, (p, img.shape)


def test_report_without_csv_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "carom_tracker.report", "--metrics-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no run folder" in proc.stderr


S = 1_000_000_000
T0 = 1_795_000_000 * S


class _Phase(NamedTuple):
    phase: int
    state: Literal["streaming", "stopped"]
    first: int
    due: int
    start_s: int
    end_s: int
    fps: float
    size: tuple[int, int]
    bitrate: int
    bytes_sent: int


PHASES = (
    _Phase(0, "streaming", 0, 60, 0, 2, 30.0, (640, 480), 0, 250_000),
    _Phase(1, "stopped", 60, 0, 2, 3, 30.0, (640, 480), 0, 0),
    _Phase(2, "streaming", 60, 120, 3, 5, 60.0, (1280, 720), 2_000_000, 500_000),
)


def _summary(p: _Phase) -> schemas.PhaseSummary:
    return schemas.PhaseSummary(
        phase=p.phase, state=p.state, first_frame=p.first, frames_due=p.due,
        frames_sent=p.due, t_start_ns=T0 + p.start_s * S, t_end_ns=T0 + p.end_s * S, fps=p.fps,
        width=p.size[0], height=p.size[1], bitrate=p.bitrate,
        keyframe_interval=60 if p.bitrate else 0, gravity=0.0, vx=100.0, vy=0.0, cor=1.0,
        background="plain", bytes_sent=p.bytes_sent,
        # Phase 2 on an emulated network, with the receiver's repairs it caused.
        network="lte" if p.phase == 2 else "clear", nacks=4 if p.phase == 2 else 0,
        retransmitted=9 if p.phase == 2 else 0, keyframe_requests=1 if p.phase == 2 else 0,
    )  # fmt: skip


def generate_phases(folder: Path, sid: str = "live") -> None:
    """One session of 3 phases: 640x480 at 30 fps, stopped for 1 s, 1280x720 at 60 fps and
    2 Mbps. Phase 0: frame 10 not detected, 20 missed; phase 2: 70 not sent, 100 lost (no
    row), 150 missed. L2 5 px (of 640x480), then 10 px (of 1280x720); render -> browser 20 ms,
    then 40 ms. Browser stats every 0.5 s, one of them redelivered: 30 then 60 fps decoded, 960
    then 1920 kbps received, one freeze of 250 ms in phase 2."""
    j = Joiner(window_ns=50 * MS)
    sink = CsvSink(folder, lambda tokens: None)
    frames = [(f, 0, T0 + f * S // 30) for f in range(60)]
    frames += [(f, 2, T0 + 3 * S + (f - 60) * S // 60) for f in range(60, 180)]
    for f, ph, t in frames:
        w, h = PHASES[ph].size
        if f == 100:
            continue
        if f == 70:
            ns = schemas.NotSent(session_id=sid, frame=f, rtp_ts=f * 3000, t_due_ns=t,
                                 reason="late", phase=ph)  # fmt: skip
            for r in j.add_not_sent(ns, t + MS).results:
                sink.add(r)
            continue
        truth = schemas.Truth(session_id=sid, frame=f, rtp_ts=f * 3000, x=100.0, y=100.0,
                              t_render_ns=t, phase=ph, width=w, height=h)  # fmt: skip
        out = [j.add_truth(truth, t + 1 * MS)]
        if f not in (20, 150):
            d = 5.0 if ph == 0 else 10.0
            hop = (20 if ph == 0 else 40) * MS
            c = schemas.Centroid(
                session_id=sid, rtp_ts=f * 3000, detected=f != 10,
                x=None if f == 10 else 100.0 + 0.6 * d, y=None if f == 10 else 100.0 + 0.8 * d,
                t_browser_recv_ns=t + hop, t_browser_analysed_ns=t + hop + 2 * MS,
                t_router_recv_ns=t + hop + 4 * MS, t_published_ns=t + hop + 5 * MS,
            )  # fmt: skip
            out.append(j.add_report(c, t + hop + 6 * MS))
        for b in out:
            for r in b.results:
                sink.add(r)
    for r in j.expire(T0 + 10 * S).results:
        sink.add(r)
    decoded = received = 0
    for k in range(10):
        t = T0 + S // 4 + k * S // 2
        ph = 0 if t < T0 + 2 * S else 1 if t < T0 + 3 * S else 2
        stats = schemas.ClientStats(
            session_id=sid, t_router_recv_ns=t, fps=(30.0, 0.0, 60.0)[ph],
            jitter_buffer_ms=(30.0, 0.0, 50.0)[ph], frames_decoded=decoded,
            bytes_received=received, freeze_count=int(t > T0 + 4 * S),
            freezes_ms=250.0 if t > T0 + 4 * S else 0.0,
        )  # fmt: skip
        assert sink.add_record(stats)
        decoded += (15, 0, 30)[ph]
        received += (60_000, 0, 120_000)[ph]
    end = schemas.SessionEnd(session_id=sid, frames_due=180, t_end_ns=T0 + 5 * S,
                             phases=[_summary(p) for p in PHASES])  # fmt: skip
    assert sink.add_record(end)
    sink.close()
    path = folder / f"{sid}.session.jsonl"  # a redelivery written by a second tracker
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines, lines[3]]))


def test_phase_figures_are_counted_against_each_phases_own_frames(tmp_path: Path) -> None:
    generate_phases(tmp_path)
    loaded = load(sorted(tmp_path.glob("*.csv")))
    recs = loaded.records["live"]
    assert recs.duplicates == 1 and len(recs.stats) == 10
    ph = phase_figures(loaded.rows, recs)
    assert (ph.outside, ph.mislabelled) == (0, 0)
    p0, p1, p2 = ph.phases
    assert p0.fig["coverage"] == accounting.Coverage(60, ok=58, not_detected=1, missed=1)
    assert p1.fig["coverage"] == accounting.Coverage(0)
    assert p2.fig["coverage"] == accounting.Coverage(120, ok=117, missed=1, not_sent=1)
    assert isinstance(p2.fig["coverage"], accounting.Coverage) and p2.fig["coverage"].no_row == 1
    assert (p0.fig["l2_mean"], p2.fig["l2_p99"]) == (pytest.approx(5.0), pytest.approx(10.0))
    hops = p2.fig["latency_ms"]
    assert isinstance(hops, dict) and hops["render_to_browser_ms"]["p50"] == 40.0
    assert (p0.sent_kbps, p1.sent_kbps, p2.sent_kbps) == (1000.0, 0.0, 2000.0)
    assert p0.browser == Browser(samples=4, decoded_fps=30.0, freezes=0, freezes_ms=0.0,
                                 jitter_buffer_ms=30.0, received_kbps=960.0)  # fmt: skip
    assert p2.browser == Browser(samples=4, decoded_fps=60.0, freezes=1, freezes_ms=250.0,
                                 jitter_buffer_ms=50.0, received_kbps=1920.0)  # fmt: skip
    assert (p1.browser.samples, p1.browser.decoded_fps) == (2, 0.0)
    # the session's own figures are unchanged: every frame, across phases
    assert figures(loaded.rows)["coverage"] == accounting.Coverage(
        180, ok=175, not_detected=1, missed=2, not_sent=1
    )


def test_a_phases_jitter_buffer_is_its_own_not_the_sessions_mean() -> None:
    """getStats' jitter_buffer_ms is a whole-session mean: 2 s after a live switch from smooth
    (12 ms/frame) to interactive (0.1 ms/frame) it still says ~6 ms. With the two counters sent,
    each phase gets its own; without them (older clients), the mean of the samples."""
    samples = []
    delay, emitted = 0.0, 0
    for k in range(8):  # 4 samples smooth, then 4 interactive; 60 frames between samples
        delay += (0.012 if k < 4 else 0.0001) * 60
        emitted += 60
        sample = schemas.ClientStats(
            session_id="s",
            t_router_recv_ns=T0 + k * S,
            jitter_buffer_ms=1000 * delay / emitted,
            jitter_buffer_delay_s=delay,
            jitter_buffer_emitted=emitted,
        )
        samples.append(sample)
    smooth, interactive = browser(samples, T0, T0 + 4 * S), browser(samples, T0 + 4 * S, T0 + 8 * S)
    assert smooth.jitter_buffer_ms == pytest.approx(12.0)
    assert interactive.jitter_buffer_ms == pytest.approx(0.1)
    assert samples[-1].jitter_buffer_ms == pytest.approx(6.05)  # what the mean would have said
    old = [msgspec.structs.replace(s, jitter_buffer_delay_s=None) for s in samples[4:]]
    assert browser(old, T0, T0 + 8 * S).jitter_buffer_ms == pytest.approx(
        sum(s.jitter_buffer_ms or 0 for s in old) / 4
    )


def test_without_the_session_end_phases_come_from_the_rows(tmp_path: Path) -> None:
    generate_phases(tmp_path)
    loaded = load(sorted(tmp_path.glob("*.csv")))
    ph = phase_figures(loaded.rows)  # no records: the session still runs
    assert [p.phase for p in ph.phases] == [0, 2]  # a stopped phase has no row to show it
    assert [p.geometry for p in ph.phases] == [["640x480"], ["1280x720"]]
    assert ph.phases[1].fig["coverage"] == accounting.Coverage(
        120, ok=117, missed=1, not_sent=1
    )  # 60..179: frame 100's lost row is seen (inside); one lost first frame would not be


def test_rows_that_disagree_with_the_recorded_phases_are_told(tmp_path: Path) -> None:
    generate_phases(tmp_path)
    loaded = load(sorted(tmp_path.glob("*.csv")))
    recs = loaded.records["live"]
    short = schemas.SessionEnd(session_id="live", frames_due=120, t_end_ns=T0 + 5 * S,
                               phases=[_summary(PHASES[0])])  # fmt: skip
    recs.ends = [short]
    relabelled = [replace(r, phase=1) if r.frame == 5 else r for r in loaded.rows]
    ph = phase_figures(relabelled, recs)
    assert (ph.outside, ph.mislabelled) == (119, 1)
    assert "WARNING: 119 row(s) of frames no phase was due" in render_phases("phases", ph)


def test_the_report_prints_a_phase_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "metrics" / "run1"
    generate_phases(run)
    generate(run)  # two sessions of one phase each, from a simulator without phases
    assert main(["--metrics-dir", str(tmp_path / "metrics"), "--out", str(tmp_path / "png")]) == 0
    text = capsys.readouterr().out
    assert "session records: 1 duplicate(s) dropped" in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("phases of live"))
    assert lines[head] == "phases of live: 3 phase(s)"
    table = lines[head + 1 : head + 5]
    assert table[0].split() == [
        "phase", "state", "fps", "size", "target", "kbps", "sent", "kbps", "keyint",
        "background", "latency", "network", "due", "ok", "not", "det", "missed", "not", "sent",
        "no", "row", "coverage", "%", "L2", "mean", "L2", "p99", "dec", "fps", "freezes", "freeze",
        "ms", "jb", "ms", "recv", "kbps", "nacks", "resent", "kf", "asks",
    ]  # fmt: skip
    assert table[1].split() == [
        "0", "streaming", "30", "640x480", "auto", "1000", "auto", "plain", "smooth", "clear",
        "60", "58", "1", "1", "0", "0", "96.67", "5.00", "5.00", "30.0", "0", "0", "30.0", "960",
        "0", "0", "0",
    ]  # fmt: skip
    assert table[2].split() == [
        "1", "stopped", "30", "640x480", "auto", "0", "auto", "plain", "smooth", "clear", "0",
        "0", "0", "0", "0", "0", "-", "-", "-", "0.0", "0", "0", "0.0", "0", "0", "0", "0",
    ]  # fmt: skip
    assert table[3].split() == [
        "2", "streaming", "60", "1280x720", "2000", "2000", "60", "plain", "smooth", "lte",
        "120", "117", "0", "1", "1", "1", "97.50", "10.00", "10.00", "60.0", "1", "250", "50.0",
        "1920", "4", "9", "1",
    ]  # fmt: skip
    assert lines[head + 5] == "  latency per hop by phase, ms p50/p99:"
    assert lines[head + 7].split()[:2] == ["0", "20.0/20.0"]
    assert lines[head + 9].split()[:2] == ["2", "40.0/40.0"]
    session = next(line for line in lines if line.startswith("session live:"))
    assert session.endswith("; frames 1280x720+640x480 (each L2 in its own frame's pixels)")
    # sessions with one phase and no record: today's report, no phase table
    assert "phases of alpha" not in text and "phases of beta" not in text
    assert "session alpha: coverage 83/100 frames due ok (83.00%)" in text
