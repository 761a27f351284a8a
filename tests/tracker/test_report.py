"""The report command on a generated CSV: figures printed, duplicates dropped, PNGs written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg

from carom import schemas
from carom_tracker.join import Joiner, Result
from carom_tracker.report import figures, load
from carom_tracker.sink import CsvSink

MS = 1_000_000


def generate(folder: Path) -> None:
    """Two sessions x 100 frames: every 10th not detected, 4 missed each, one duplicate."""
    j = Joiner(window_ns=50 * MS)
    sink = CsvSink(folder, lambda tokens: None)
    t0 = 1_700_000_000_000_000_000
    first: Result | None = None
    for f in range(100):
        now = t0 + f * 16 * MS
        for sid in ("alpha", "beta"):
            t = schemas.Truth(session_id=sid, frame=f, rtp_ts=f * 1500, x=100.0, y=100.0,
                              t_render_ns=now)  # fmt: skip
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
    assert (loaded.raw, loaded.duplicates, len(loaded.rows)) == (201, 1, 200)
    fig = figures(loaded.rows)
    assert (fig["frames"], fig["missed"], fig["not_detected"], fig["ok"]) == (200, 8, 20, 172)
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
    assert "session alpha: 100 frames, 86 ok, 10 not detected, 4 missed" in text
    assert "overall: 200 frames, 172 ok, 20 not detected, 8 missed" in text
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
