"""CSV rows: fixed formats, empty cells for what does not exist, and a lossless read-back."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

import msgspec
import pytest
from msgspec.structs import replace

from carom.schemas import Centroid, NotSent, Truth
from carom_tracker import csvrow
from carom_tracker.csvrow import COLUMN_DOCS, COLUMNS, from_row, to_row
from carom_tracker.join import Joiner, Result

T0 = 1_795_000_000 * 10**9
MS = 1_000_000


def _truth(rtp: int = 42) -> Truth:
    return Truth(session_id="s-1", frame=9, rtp_ts=rtp, x=100.25, y=200.5, t_render_ns=T0)


def _report(rtp: int = 42, detected: bool = True) -> Centroid:
    return Centroid(
        session_id="s-1",
        rtp_ts=rtp,
        detected=detected,
        x=103.25 if detected else None,
        y=204.5 if detected else None,
        t_browser_recv_ns=T0 + 30 * MS,
        t_browser_analysed_ns=T0 + 34_500_000,
        t_router_recv_ns=T0 + 40 * MS,
        t_published_ns=T0 + 41 * MS,
    )


def _ok() -> Result:
    j = Joiner()
    j.add_truth(_truth(), T0 + 20 * MS)
    (r,) = j.add_report(_report(), T0 + 45 * MS, consumed_ns=T0 + 44 * MS).results
    return r


def _missed() -> Result:
    j = Joiner(window_ns=2000 * MS)
    j.add_truth(_truth(7), T0 + 20 * MS)
    (r,) = j.expire(T0 + 2020 * MS).results
    return r


def _orphan() -> Result:
    j = Joiner(window_ns=2000 * MS)
    j.add_report(_report(8), T0 + 50 * MS)
    (r,) = j.expire(T0 + 2050 * MS).results
    return r


def _not_detected() -> Result:
    j = Joiner()
    j.add_truth(_truth(), T0 + 20 * MS)
    (r,) = j.add_report(_report(detected=False), T0 + 45 * MS, consumed_ns=T0 + 44 * MS).results
    return r


def cells(r: Result) -> dict[str, str]:
    return dict(zip(COLUMNS, to_row(r), strict=True))


def test_columns_are_documented_one_line_each() -> None:
    assert len(COLUMNS) == len(set(COLUMNS)) == 30
    assert list(COLUMN_DOCS) == list(COLUMNS)
    assert all(doc.strip() and "\n" not in doc for doc in COLUMN_DOCS.values())
    assert COLUMNS[:9] == (
        "session_id", "frame", "rtp_ts", "status", "truth_x", "truth_y", "x", "y", "l2_px",
    )  # fmt: skip


def test_ok_row_has_fixed_formats_and_every_hop() -> None:
    c = cells(_ok())
    assert (c["session_id"], c["frame"], c["rtp_ts"], c["status"]) == ("s-1", "9", "42", "ok")
    assert (c["truth_x"], c["truth_y"], c["x"], c["y"]) == (
        "100.250",
        "200.500",
        "103.250",
        "204.500",
    )
    assert c["l2_px"] == "5.0000"
    assert c["t_render_ns"] == str(T0) and c["t_tracker_consumed_ns"] == str(T0 + 44 * MS)
    assert c["t_computed_ns"] == str(T0 + 45 * MS)
    assert {name: c[name] for name, _, _ in csvrow.LATENCIES} == {
        "render_to_browser_ms": "30.000",
        "browser_decode_to_analysed_ms": "4.500",
        "analysed_to_router_ms": "5.500",
        "router_to_published_ms": "1.000",
        "published_to_tracker_ms": "3.000",
        "tracker_to_computed_ms": "1.000",
        "end_to_end_ms": "40.000",
        "render_to_computed_ms": "45.000",
    }
    assert len(to_row(_ok())) == len(COLUMNS)


@pytest.mark.parametrize("make", [_missed, _orphan, _not_detected])
def test_values_that_do_not_exist_are_empty_never_zero(make: Callable[[], Result]) -> None:
    r = make()
    c = cells(r)
    assert c["l2_px"] == ""
    if r.status == "not_detected":
        assert c["x"] == c["y"] == "" and c["render_to_computed_ms"] == "45.000"
    else:
        assert c["t_tracker_consumed_ns"] == c["tracker_to_computed_ms"] == ""
        assert c["published_to_tracker_ms"] == c["render_to_computed_ms"] == ""
    for name, value in c.items():
        if name != "phase":  # phase 0 is a phase, the first, not a missing value
            assert value not in ("0", "0.000", "0.0000"), name


def test_missed_row() -> None:
    c = cells(_missed())
    assert (c["status"], c["frame"], c["truth_x"], c["x"], c["y"]) == (
        "missed",
        "9",
        "100.250",
        "",
        "",
    )
    assert c["t_render_ns"] == str(T0) and c["t_computed_ns"] == str(T0 + 2020 * MS)
    assert all(c[n] == "" for n in csvrow.STAMPS[1:6])
    assert all(c[n] == "" for n, _, _ in csvrow.LATENCIES)


def test_orphan_row_keeps_the_report_side() -> None:
    c = cells(_orphan())
    assert (c["status"], c["frame"], c["truth_x"], c["truth_y"]) == ("orphan", "", "", "")
    assert (c["x"], c["y"], c["t_render_ns"]) == ("103.250", "204.500", "")
    assert (c["analysed_to_router_ms"], c["render_to_browser_ms"]) == ("5.500", "")


def test_negative_hops_keep_their_sign_and_negative_zero_does_not_show() -> None:
    r = _ok()
    skewed = replace(r, t_browser_recv_ns=T0 - 2 * MS, t_browser_analysed_ns=T0 - 2 * MS - 1)
    c = cells(skewed)
    assert c["render_to_browser_ms"] == "-2.000" and c["browser_decode_to_analysed_ms"] == "0.000"


@pytest.mark.parametrize("make", [_ok, _missed, _orphan, _not_detected])
def test_round_trip_through_a_csv_file(make: Callable[[], Result]) -> None:
    r = make()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerow(to_row(r))
    (parsed,) = [from_row(d) for d in csv.DictReader(io.StringIO(buf.getvalue()))]
    for name in ("session_id", "frame", "rtp_ts", "status", "truth_x", "truth_y", "x", "y", "l2"):
        assert getattr(parsed, name) == getattr(r, name), name  # these values survive 3/4 places
    assert csvrow.stamps(parsed) == csvrow.stamps(r)
    assert parsed.latencies_ms == {
        k: None if v is None else round(v, 3) for k, v in csvrow.latencies_ms(r).items()
    }
    assert to_row(parsed) == to_row(r)  # a Row writes back to the very same cells
    # the sink's fast line is byte for byte what the csv module writes
    assert csvrow.to_line(r) == buf.getvalue().splitlines(keepends=True)[1]


def test_extra_columns_are_ignored_and_bad_cells_are_named() -> None:
    good = {**cells(_ok()), "future_column": "x"}
    assert from_row(good).l2 == 5.0
    with pytest.raises(ValueError, match=r"lacks column.*l2_px"):
        from_row({k: v for k, v in good.items() if k != "l2_px"})
    with pytest.raises(ValueError, match="status"):
        from_row({**good, "status": "great"})
    with pytest.raises(ValueError, match="t_render_ns"):
        from_row({**good, "t_render_ns": "12.5"})
    with pytest.raises(ValueError, match="l2_px"):
        from_row({**good, "l2_px": "nan"})
    with pytest.raises(ValueError, match="rtp_ts"):
        from_row({**good, "rtp_ts": ""})


def test_latency_column_carries_the_playout_mode() -> None:
    j = Joiner()
    j.add_truth(msgspec.structs.replace(_truth(), latency="interactive"), T0 + 20 * MS)
    (r,) = j.add_report(_report(), T0 + 45 * MS).results
    assert cells(r)["latency"] == "interactive"
    assert cells(_ok())["latency"] == "smooth" and cells(_missed())["latency"] == "smooth"
    assert cells(_orphan())["latency"] == ""  # no truth: no mode
    assert from_row(cells(r)).latency == "interactive"
    with pytest.raises(ValueError, match="latency"):
        from_row({**cells(r), "latency": "90-10"})


def test_files_from_before_the_latency_column_read_back_as_smooth() -> None:
    old = {k: v for k, v in cells(_ok()).items() if k != "latency"}
    assert from_row(old).latency == "smooth"
    orphan = {k: v for k, v in cells(_orphan()).items() if k != "latency"}
    assert from_row(orphan).latency is None


def test_phase_and_geometry_come_from_the_frame_and_are_appended_last() -> None:
    """The new columns come after every older one, so an older reader's columns keep their
    places; a not-sent frame has its phase and no geometry, an orphan neither."""
    assert COLUMNS[-4:] == ("latency", "phase", "width", "height")
    sized = msgspec.structs.replace(_truth(), phase=3, width=1280, height=720)
    j = Joiner()
    j.add_truth(sized, T0 + 20 * MS)
    (r,) = j.add_report(_report(), T0 + 45 * MS).results
    assert (cells(r)["phase"], cells(r)["width"], cells(r)["height"]) == ("3", "1280", "720")
    assert (from_row(cells(r)).phase, from_row(cells(r)).width) == (3, 1280)
    ns = NotSent(session_id="s-1", frame=10, rtp_ts=99, t_due_ns=T0, reason="late", phase=2)
    (n,) = Joiner().add_not_sent(ns, T0).results
    assert (cells(n)["phase"], cells(n)["width"], cells(n)["height"]) == ("2", "", "")
    assert (cells(_missed())["phase"], cells(_missed())["width"]) == ("0", "")  # an old truth
    assert (cells(_orphan())["phase"], cells(_orphan())["width"]) == ("", "")


def test_files_from_before_the_phase_columns_read_back_as_phase_0() -> None:
    old = {k: v for k, v in cells(_ok()).items() if k not in ("phase", "width", "height")}
    assert (from_row(old).phase, from_row(old).width, from_row(old).height) == (0, None, None)
    orphan = {k: v for k, v in cells(_orphan()).items() if k not in ("phase", "width")}
    assert from_row(orphan).phase is None
    with pytest.raises(ValueError, match="width"):
        from_row({**cells(_ok()), "width": "wide"})


def test_a_file_of_another_tracker_version_is_continued_in_its_own_layout() -> None:
    older = ",".join(COLUMNS[:-3])
    assert csvrow.width_of(",".join(COLUMNS)) is None
    assert csvrow.width_of(older) == len(COLUMNS) - 3
    assert csvrow.width_of(",".join((*COLUMNS, "future"))) == len(COLUMNS) + 1
    assert csvrow.width_of("a,b,c") is None  # not ours: written as today's
    cut = csvrow.to_line(_ok(), len(COLUMNS) - 3)
    assert cut == ",".join(to_row(_ok())[:-3]) + "\n"
    (back,) = csv.DictReader(io.StringIO(older + "\n" + cut))
    assert from_row(back).phase == 0 and from_row(back).l2 == 5.0
    padded = csvrow.to_line(_ok(), len(COLUMNS) + 1)
    assert padded == ",".join(to_row(_ok())) + ",\n"


def test_the_generated_line_writer_writes_what_the_cell_writers_write() -> None:
    """``to_line`` (one generated f-string) must equal ``to_row``'s cells joined, for every kind
    of row and for values that format awkwardly: negatives that round to 0 (written as 0, not
    -0.000), halves at the last decimal, negative hops (a bad clock estimate), empty cells."""
    import random

    rng = random.Random(7)
    awkward = [0.0, -0.0, -0.0004, -0.0005, -0.0006, 0.0005, 0.0015, 1.0005, 2.675, 123.4565,
               -3.25, 8191.9999, 1e-9, -1e-9]  # fmt: skip
    rows = [_ok(), _missed(), _orphan()]
    for i in range(2000):
        base = rng.choice(rows)
        stamps = {name: (None if rng.random() < 0.1 else T0 + rng.randint(-5 * MS, 90 * MS))
                  for name in csvrow.STAMPS}  # fmt: skip
        floats = {name: (None if rng.random() < 0.1 else
                         rng.choice(awkward) if i % 2 else rng.uniform(-1, 8192))
                  for name in ("truth_x", "truth_y", "x", "y", "l2")}  # fmt: skip
        rows.append(replace(base, **stamps, **floats, clock_error_ns=rng.randint(-MS, MS)))
    for r in rows:
        assert csvrow.to_line(r) == ",".join(to_row(r)) + "\n"
    cells = {c for r in rows for c in csvrow.to_line(r).rstrip("\n").split(",")}
    assert not cells & {"-0.000", "-0.0000"}
    assert {"0.000", "0.0000"} <= cells  # the awkward values did reach the writers
