"""The one frame record: every frame's row, CSV line and published result, byte for byte.

A fixed input through the join covers every kind of row (ok, not detected, missed for each
reason, not sent, orphan, evicted, a skewed clock, a report without browser times). Its CSV lines
and its published JSON were recorded before the result record became one (``join.FrameRow``);
they must never change without meaning to: files and the errors topic outlive any release.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from carom import schemas
from carom.schemas import Centroid, FrameResult, NotSent, Truth
from carom_tracker import csvrow
from carom_tracker.join import LOCAL_FIELDS, ROW_FIELDS, WIRE_FIELDS, Joiner, Result
from carom_tracker.sink import CsvSink

T0 = 1_795_000_000 * 10**9
MS = 1_000_000
#: Fields written rounded (positions, L2, the clock bound in ms): compared through their cells.
ROUNDED = ("truth_x", "truth_y", "x", "y", "l2", "clock_error_ns")

GOLDEN_CSV = """\
s-1,0,1000,ok,100.250,200.500,103.250,204.500,5.0000,1795000000000000000,1795000000030000000,1795000000034500000,1795000000040000000,1795000000041000000,1795000000044000000,1795000000045000000,30.000,4.500,5.500,1.000,3.000,1.000,40.000,45.000,,1.235,smooth,0,640,480
s-1,1,4000,not_detected,100.250,200.500,,,,1795000000016000000,1795000000046000000,1795000000050500000,1795000000056000000,1795000000057000000,1795000000047000000,1795000000047000000,30.000,4.500,5.500,1.000,-10.000,0.000,40.000,31.000,,0.000,interactive,0,,
s-1,3,10000,not_sent,,,,,,1795000000048000000,,,,,,1795000000049000000,,,,,,,,,late,,0-100,1,,
s-1,5,16000,ok,10.000,10.000,13.000,14.000,5.0005,1795000000080000000,1795000000078000000,1795000000077999999,1795000000120000000,1795000000121000000,1795000000081000000,1795000000082000000,-2.000,0.000,42.000,1.000,-40.000,1.000,40.000,2.000,,3.000,smooth,0,,
s-1,6,19000,ok,100.250,200.500,103.250,204.500,5.0000,1795000000096000000,,,1795000000136000000,1795000000137000000,1795000000084000000,1795000000084000000,,,,1.000,-53.000,0.000,40.000,-12.000,,,smooth,2,1280,720
s-1,2,7000,missed,0.001,8191.999,,,,1795000000032000000,,,,,,1795000000200000000,,,,,,,,,no_report,,smooth,0,,
s-1,,13000,orphan,,,1.235,7.000,,,1795000000094000000,1795000000098500000,1795000000104000000,1795000000105000000,,1795000000200000000,,4.500,5.500,1.000,,,,,,,,,,
s-1,4,13000,missed,100.250,200.500,,,,1795000000064000000,,,,,,1795000000201000000,,,,,,,,,truth_late,,smooth,0,,
s-2,0,1000,missed,100.250,200.500,,,,1795000000000000000,,,,,,1795000000204000000,,,,,,,,,memory_cap,,interactive,0,,
s-2,,31000,orphan,,,50.500,60.500,,,1795000000190000000,1795000000194500000,1795000000200000000,1795000000201000000,,1795000000218000000,,4.500,5.500,1.000,,,,,memory_cap,,,,,
s-2,1,4000,missed,100.250,200.500,,,,1795000000016000000,,,,,,1795000000231000000,,,,,,,,,memory_cap,,interactive,0,,
s-2,2,7000,missed,100.250,200.500,,,,1795000000032000000,,,,,,1795000000231000000,,,,,,,,,memory_cap,,interactive,0,,
s-2,,34000,orphan,,,50.500,60.500,,,1795000000206000000,1795000000210500000,1795000000216000000,1795000000217000000,,1795000000231000000,,4.500,5.500,1.000,,,,,memory_cap,,,,,
s-2,,37000,orphan,,,50.500,60.500,,,1795000000222000000,1795000000226500000,1795000000232000000,1795000000233000000,,1795000000231000000,,4.500,5.500,1.000,,,,,memory_cap,,,,,
s-3,,1000,orphan,,,103.250,204.500,,,1795000000030000000,1795000000034500000,1795000000040000000,1795000000041000000,,1795000000700000000,,4.500,5.500,1.000,,,,,,,,,,
s-4,0,1000,missed,100.250,200.500,,,,1795000000000000000,,,,,,1795000000700000000,,,,,,,,,no_report,,smooth,0,,
"""

GOLDEN_JSON = """\
{"kind":"error","schema_version":1,"session_id":"s-1","frame":0,"rtp_ts":1000,"status":"ok","truth_x":100.25,"truth_y":200.5,"x":103.25,"y":204.5,"l2":5.0,"t_render_ns":1795000000000000000,"t_browser_recv_ns":1795000000030000000,"t_browser_analysed_ns":1795000000034500000,"t_router_recv_ns":1795000000040000000,"t_published_ns":1795000000041000000,"t_tracker_consumed_ns":1795000000044000000,"t_computed_ns":1795000000045000000}
{"kind":"error","schema_version":1,"session_id":"s-1","frame":1,"rtp_ts":4000,"status":"not_detected","truth_x":100.25,"truth_y":200.5,"x":null,"y":null,"l2":null,"t_render_ns":1795000000016000000,"t_browser_recv_ns":1795000000046000000,"t_browser_analysed_ns":1795000000050500000,"t_router_recv_ns":1795000000056000000,"t_published_ns":1795000000057000000,"t_tracker_consumed_ns":1795000000047000000,"t_computed_ns":1795000000047000000}
{"kind":"error","schema_version":1,"session_id":"s-1","frame":3,"rtp_ts":10000,"status":"not_sent","truth_x":null,"truth_y":null,"x":null,"y":null,"l2":null,"t_render_ns":1795000000048000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":null,"t_published_ns":null,"t_tracker_consumed_ns":null,"t_computed_ns":1795000000049000000}
{"kind":"error","schema_version":1,"session_id":"s-1","frame":5,"rtp_ts":16000,"status":"ok","truth_x":10.0,"truth_y":10.0,"x":13.0001,"y":14.00049,"l2":5.000452004579185,"t_render_ns":1795000000080000000,"t_browser_recv_ns":1795000000078000000,"t_browser_analysed_ns":1795000000077999999,"t_router_recv_ns":1795000000120000000,"t_published_ns":1795000000121000000,"t_tracker_consumed_ns":1795000000081000000,"t_computed_ns":1795000000082000000}
{"kind":"error","schema_version":1,"session_id":"s-1","frame":6,"rtp_ts":19000,"status":"ok","truth_x":100.25,"truth_y":200.5,"x":103.25,"y":204.5,"l2":5.0,"t_render_ns":1795000000096000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":1795000000136000000,"t_published_ns":1795000000137000000,"t_tracker_consumed_ns":1795000000084000000,"t_computed_ns":1795000000084000000}
{"kind":"error","schema_version":1,"session_id":"s-1","frame":2,"rtp_ts":7000,"status":"missed","truth_x":0.0005,"truth_y":8191.9995,"x":null,"y":null,"l2":null,"t_render_ns":1795000000032000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":null,"t_published_ns":null,"t_tracker_consumed_ns":null,"t_computed_ns":1795000000200000000}
None
{"kind":"error","schema_version":1,"session_id":"s-1","frame":4,"rtp_ts":13000,"status":"missed","truth_x":100.25,"truth_y":200.5,"x":null,"y":null,"l2":null,"t_render_ns":1795000000064000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":null,"t_published_ns":null,"t_tracker_consumed_ns":null,"t_computed_ns":1795000000201000000}
{"kind":"error","schema_version":1,"session_id":"s-2","frame":0,"rtp_ts":1000,"status":"missed","truth_x":100.25,"truth_y":200.5,"x":null,"y":null,"l2":null,"t_render_ns":1795000000000000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":null,"t_published_ns":null,"t_tracker_consumed_ns":null,"t_computed_ns":1795000000204000000}
None
{"kind":"error","schema_version":1,"session_id":"s-2","frame":1,"rtp_ts":4000,"status":"missed","truth_x":100.25,"truth_y":200.5,"x":null,"y":null,"l2":null,"t_render_ns":1795000000016000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":null,"t_published_ns":null,"t_tracker_consumed_ns":null,"t_computed_ns":1795000000231000000}
{"kind":"error","schema_version":1,"session_id":"s-2","frame":2,"rtp_ts":7000,"status":"missed","truth_x":100.25,"truth_y":200.5,"x":null,"y":null,"l2":null,"t_render_ns":1795000000032000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":null,"t_published_ns":null,"t_tracker_consumed_ns":null,"t_computed_ns":1795000000231000000}
None
None
None
{"kind":"error","schema_version":1,"session_id":"s-4","frame":0,"rtp_ts":1000,"status":"missed","truth_x":100.25,"truth_y":200.5,"x":null,"y":null,"l2":null,"t_render_ns":1795000000000000000,"t_browser_recv_ns":null,"t_browser_analysed_ns":null,"t_router_recv_ns":null,"t_published_ns":null,"t_tracker_consumed_ns":null,"t_computed_ns":1795000000700000000}
"""


def _truth(
    sid: str,
    f: int,
    *,
    x: float = 100.25,
    y: float = 200.5,
    latency: str = "smooth",
    phase: int = 0,
    size: tuple[int, int] | None = None,
) -> Truth:
    return Truth(session_id=sid, frame=f, rtp_ts=1000 + 3000 * f, x=x, y=y,
                 t_render_ns=T0 + f * 16 * MS, latency=latency, phase=phase,
                 width=size and size[0], height=size and size[1])  # fmt: skip


def _report(
    sid: str,
    f: int,
    *,
    detected: bool = True,
    x: float = 103.25,
    y: float = 204.5,
    err: int | None = None,
    recv: int | None = 30 * MS,
    analysed: int | None = 34_500_000,
) -> Centroid:
    base = T0 + f * 16 * MS
    return Centroid(
        session_id=sid, rtp_ts=1000 + 3000 * f, detected=detected,
        x=x if detected else None, y=y if detected else None,
        t_browser_recv_ns=None if recv is None else base + recv,
        t_browser_analysed_ns=None if analysed is None else base + analysed,
        t_router_recv_ns=base + 40 * MS, t_published_ns=base + 41 * MS,
        clock_offset_ns=-5, clock_error_ns=err,
    )  # fmt: skip


def results() -> list[Result]:
    """Every row of the fixed input, in the order the join gave them."""
    j = Joiner(window_ns=50 * MS, max_pending=2, max_sessions=2)
    skewed = _report("s-1", 5, x=13.0001, y=14.00049, recv=-2 * MS, analysed=-2 * MS - 1,
                     err=3_000_000)  # fmt: skip
    late = NotSent(session_id="s-1", frame=3, rtp_ts=10_000, t_due_ns=T0 + 48 * MS, reason="late",
                   latency="0-100", phase=1)  # fmt: skip
    later = T0 + 200 * MS
    batches = [
        j.add_truth(_truth("s-1", 0, size=(640, 480)), T0 + 20 * MS),
        j.add_report(_report("s-1", 0, err=1_234_567), T0 + 45 * MS, consumed_ns=T0 + 44 * MS),
        j.add_truth(_truth("s-1", 1, latency="interactive"), T0 + 46 * MS),
        j.add_report(_report("s-1", 1, detected=False, err=0), T0 + 47 * MS),
        j.add_truth(_truth("s-1", 2, x=0.0005, y=8191.9995), T0 + 48 * MS),  # missed, no report
        j.add_not_sent(late, T0 + 49 * MS),
        j.add_report(_report("s-1", 4, x=1.23456, y=7.0004999), T0 + 50 * MS),  # an orphan
        j.add_truth(_truth("s-1", 5, x=10.0, y=10.0), T0 + 81 * MS),
        j.add_report(skewed, T0 + 82 * MS, consumed_ns=T0 + 81 * MS),  # -2 ms, and -0.000001 ms
        j.add_truth(_truth("s-1", 6, phase=2, size=(1280, 720)), T0 + 83 * MS),
        j.add_report(_report("s-1", 6, recv=None, analysed=None), T0 + 84 * MS),
        j.expire(later),
        j.add_truth(_truth("s-1", 4), later + 1 * MS),  # after its report was given up
        *(j.add_truth(_truth("s-2", f, latency="interactive"), later + (2 + f) * MS)
          for f in range(3)),  # one over max_pending
        *(j.add_report(_report("s-2", f, x=50.5, y=60.5), later + (6 + f) * MS)
          for f in range(10, 13)),  # one over max_pending
        j.add_report(_report("s-3", 0), later + 30 * MS),  # a third session evicts s-2
        j.add_truth(_truth("s-4", 0), later + 31 * MS),
        j.expire(later + 500 * MS),
    ]  # fmt: skip
    return [r for b in batches for r in b.results]


def test_rows_are_the_recorded_lines() -> None:
    assert "".join(csvrow.to_line(r) for r in results()) == GOLDEN_CSV


def test_published_results_are_the_recorded_json() -> None:
    published = [r.to_error_result() for r in results()]
    assert "".join(
        "None\n" if e is None else schemas.encode(e).decode() + "\n" for e in published
    ) == GOLDEN_JSON  # fmt: skip


def test_the_sink_writes_the_recorded_lines_under_the_header(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path, lambda tokens: None, fsync=lambda fd: None)
    for r in results():
        assert sink.add(r, r.tokens)
    sink.close()
    header = ",".join(csvrow.COLUMNS) + "\n"
    for sid in ("s-1", "s-2", "s-3", "s-4"):
        mine = [line for line in GOLDEN_CSV.splitlines(keepends=True) if line.startswith(f"{sid},")]
        assert (tmp_path / f"{sid}.csv").read_text() == header + "".join(mine)


@pytest.mark.parametrize(
    "dropped",
    [
        (),
        ("phase", "width", "height"),
        ("latency", "phase", "width", "height"),
        ("reason", "clock_error_ms", "latency", "phase", "width", "height"),
    ],
    ids=str,
)
def test_recorded_lines_read_back_and_write_back_the_same(dropped: tuple[str, ...]) -> None:
    """Old files (without the columns added since) read back: their latency as smooth, their
    phase as 0 (one phase then), no geometry."""
    text = ",".join(csvrow.COLUMNS) + "\n" + GOLDEN_CSV
    for r, cells in zip(results(), csv.DictReader(io.StringIO(text)), strict=True):
        row = csvrow.from_row({k: v for k, v in cells.items() if k not in dropped})
        written = {"l2": "l2_px", "clock_error_ns": "clock_error_ms"}
        kept = [n for n in ROW_FIELDS if written.get(n, n) not in dropped]
        exact = [n for n in kept if n not in ROUNDED]
        assert [getattr(row, n) for n in exact] == [getattr(r, n) for n in exact]
        assert row.latencies_ms == {k: v if v is None else round(v, 3)
                                    for k, v in csvrow.latencies_ms(r).items()}  # fmt: skip
        if not dropped:
            assert csvrow.to_line(row) == csvrow.to_line(r)
        else:
            frame_row = r.status != "orphan"
            if "latency" in dropped:
                assert row.latency == ("smooth" if frame_row else None)
            assert row.phase == (0 if frame_row else None)
            assert row.width is None and row.height is None
            assert row.reason == (r.reason if "reason" not in dropped else None)


def test_columns_and_the_wire_record_come_from_the_record_fields() -> None:
    latencies = {name for name, _, _ in csvrow.LATENCIES}
    renamed = {"l2": "l2_px", "clock_error_ns": "clock_error_ms"}
    assert [c for c in csvrow.COLUMNS if c not in latencies] == [
        renamed.get(n, n) for n in ROW_FIELDS
    ]
    # the wire record is the row without what only the CSV holds: no copy of its own
    assert LOCAL_FIELDS == ("reason", "clock_error_ns", "latency", "phase", "width", "height")
    assert set(FrameResult.__struct_fields__) - {"schema_version"} == set(WIRE_FIELDS)
    assert [n for n in ROW_FIELDS if n not in LOCAL_FIELDS] == list(WIRE_FIELDS)
