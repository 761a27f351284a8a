"""The report command on a generated CSV: figures printed, duplicates dropped, PNGs written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg

from carom import accounting, schemas
from carom_tracker.join import Joiner, Result
from carom_tracker.report import figures, load
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
