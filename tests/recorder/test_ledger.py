"""The recorder's pure accounting: admission (first copy, redelivery, duplicate), rows and their
hops, verdicts against the router's ChannelEnd, percentiles and the report's lines."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from carom.channels import ChannelEnd, ChannelMessage
from carom_recorder.ledger import (
    COLUMNS,
    HOP_NAMES,
    Ledger,
    Outcome,
    Row,
    RowError,
    latency_stats,
    percentile,
    report_lines,
)

T0 = 1_800_000_000_000_000_000


def message(seq: int, capture: int | None = T0, payload: bytes = b"x" * 10) -> ChannelMessage:
    return ChannelMessage(
        session_id="s1", type="camera", format="video", seq=seq, t_capture_ms=1.0,
        t_capture_ns=capture, clock_error_ns=0, t_router_recv_ns=T0 + 2_000_000,
        t_published_ns=T0 + 2_500_000, meta={"codec": "vp8", "key": True, "timestamp_us": 0},
        payload=payload,
    )  # fmt: skip


def end(
    last: int,
    accepted: int,
    refused: Sequence[int] = (),
    failed: Sequence[int] = (),
    n_refused: int | None = None,
) -> ChannelEnd:
    return ChannelEnd(
        session_id="s1", type="camera", accepted=accepted, last_seq=last,
        refused=len(refused) if n_refused is None else n_refused,
        refused_seqs=list(refused), failed_seqs=list(failed), reason="bye",
    )  # fmt: skip


def filled(seqs: list[int]) -> Ledger:
    ledger = Ledger("s1", "camera")
    for s in seqs:
        assert ledger.admit(s, f"1:{s}:-1:-1") is Outcome.WRITE
        ledger.written(Row.of(message(s), f"1:{s}:-1:-1", T0 + 4_000_000))
    return ledger


def test_first_copy_is_written_the_same_message_again_is_a_redelivery_another_a_duplicate() -> None:
    ledger = Ledger("s1", "camera")
    assert ledger.admit(0, "1:0:-1:-1") is Outcome.WRITE
    assert ledger.admit(0, "1:0:-1:-1") is Outcome.REDELIVERED
    assert ledger.admit(0, "1:7:-1:-1") is Outcome.DUPLICATE
    assert ledger.admit(0, "1:8:-1:-1") is Outcome.DUPLICATE
    assert ledger.admit(1, "1:1:-1:-1") is Outcome.WRITE
    assert (ledger.redelivered, ledger.duplicate_count, ledger.duplicates) == (1, 2, {0: 2})
    ledger.forget(1)  # its write failed: it comes again and is written then
    assert ledger.admit(1, "1:1:-1:-1") is Outcome.WRITE


def test_row_hops_cells_and_parse_round_trip() -> None:
    row = Row.of(message(3), "5:6:-1:-1", T0 + 4_000_000)
    assert row.hops() == {
        "capture_to_router": 2.0, "router_to_published": 0.5,
        "published_to_consumed": 1.5, "capture_to_consumed": 4.0,
    }  # fmt: skip
    cells = row.cells()
    assert len(cells) == len(COLUMNS) and cells[:4] == ["camera", "3", "10", "5:6:-1:-1"]
    assert cells[-4:] == ["2.000", "0.500", "1.500", "4.000"]
    assert Row.parse(cells) == row
    unknown = Row.of(message(4, capture=None), "5:7:-1:-1", T0 + 4_000_000)
    assert unknown.hops()["capture_to_router"] is None
    assert unknown.hops()["capture_to_consumed"] is None
    assert unknown.cells()[4] == "" and unknown.cells()[8] == ""
    assert Row.parse(unknown.cells()) == unknown
    with pytest.raises(RowError):
        Row.parse(cells[:5])
    with pytest.raises(RowError):
        Row.parse(["camera", "x", *cells[2:]])


def test_a_negative_hop_keeps_its_sign() -> None:
    row = Row.of(message(0, capture=T0 + 3_000_000), "1:0:-1:-1", T0 + 4_000_000)
    assert row.hops()["capture_to_router"] == -1.0


def test_all_received_is_exactly_once() -> None:
    ledger = filled([0, 1, 2, 3])
    ledger.end = end(3, accepted=4)
    v = ledger.verdict()
    assert v.ok and (v.received, v.expected, v.missing, v.unexpected) == (4, 4, (), ())


def test_refused_and_failed_seqs_are_accounted_for() -> None:
    ledger = filled([0, 2, 4])
    ledger.end = end(5, accepted=3, refused=[1, 5], failed=[3])
    v = ledger.verdict()
    assert v.ok, v
    assert (v.expected, v.refused, v.failed) == (3, 2, 1)


def test_a_gap_is_missing_and_named() -> None:
    ledger = filled([0, 1, 4, 5])
    assert ledger.gaps() == [2, 3]
    ledger.end = end(6, accepted=7)
    v = ledger.verdict()
    assert not v.ok and v.status == "missing"
    assert v.missing == (2, 3, 6)
    assert (v.received, v.expected) == (4, 7)


def test_an_end_that_disagrees_is_not_exactly_once() -> None:
    # A seq received that the end says it refused, and one beyond its last seq.
    ledger = filled([0, 1, 2, 9])
    ledger.end = end(2, accepted=2, refused=[1])
    v = ledger.verdict()
    assert not v.ok and v.missing == () and v.unexpected == (1, 9)
    # Every seq here, but the router says it accepted more than arrived (and it listed none
    # missing: one seq of a session the recorder never saw would show here).
    ledger = filled([0, 1])
    ledger.end = end(1, accepted=3)
    assert not ledger.verdict().ok


def test_refusals_not_all_listed_leave_their_seqs_missing() -> None:
    ledger = filled([0, 2])
    ledger.end = end(3, accepted=2, refused=[1], n_refused=2)
    v = ledger.verdict()
    assert not v.ok and v.missing == (3,) and v.unlisted_refusals == 1


def test_without_an_end_nothing_is_proven() -> None:
    ledger = filled([0, 2])
    v = ledger.verdict()
    assert v.status == "no_end" and not v.ok and v.expected is None and v.missing == (1,)


def test_an_empty_end_with_nothing_received_is_exactly_once() -> None:
    ledger = Ledger("s1", "camera")
    ledger.end = end(-1, accepted=0)
    assert ledger.verdict().ok


def test_restore_rebuilds_seen_rows_and_duplicates() -> None:
    rows = [Row.of(message(s), f"1:{s}:-1:-1", T0 + 4_000_000) for s in (0, 1, 1, 2)]
    ledger = Ledger("s1", "camera")
    ledger.restore(rows, [1, 1])
    assert set(ledger.seen) == {0, 1, 2} and len(ledger.rows) == 3
    assert ledger.duplicates == {1: 2} and ledger.bytes == 30
    assert ledger.admit(1, "1:1:-1:-1") is Outcome.REDELIVERED
    assert ledger.admit(2, "2:2:-1:-1") is Outcome.DUPLICATE


def test_summary_names_everything() -> None:
    ledger = filled([0, 1, 3])
    ledger.admit(1, "9:9:-1:-1")
    ledger.end = end(3, accepted=3)
    s = ledger.summary({"file": "camera.webm", "decoded_frames": 3})
    assert s["verdict"] == "missing" and not s["exactly_once"]
    assert (s["received"], s["expected"], s["missing_seqs"]) == (3, 4, [2])
    assert (s["duplicates_dropped"], s["duplicate_seqs"]) == (1, [1])
    assert s["media"] == {"file": "camera.webm", "decoded_frames": 3}
    assert set(s["latency_ms"]) == set(HOP_NAMES)
    assert s["latency_ms"]["capture_to_consumed"] == {"count": 3, "p50_ms": 4.0, "p99_ms": 4.0}


def test_percentiles_interpolate_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0 and percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_latency_stats_skip_unknown_hops() -> None:
    rows = [
        Row.of(message(0, capture=None), "1:0:-1:-1", T0 + 4_000_000),
        Row.of(message(1), "1:1:-1:-1", T0 + 6_000_000),
    ]
    stats = latency_stats(rows)
    assert stats["capture_to_router"] == {"count": 1, "p50_ms": 2.0, "p99_ms": 2.0}
    assert stats["published_to_consumed"]["count"] == 2
    assert stats["published_to_consumed"]["p50_ms"] == 2.5


def test_report_lines_show_latency_per_type_and_each_verdict() -> None:
    good = filled([0, 1])
    good.end = end(1, accepted=2)
    bad = filled([0, 1, 4, 5, 6])
    bad.session_id = "s2"
    bad.end = end(7, accepted=8)
    lines = report_lines(
        [good.summary({"file": "camera.webm", "decoded_frames": 2}), bad.summary(None)],
        {"camera": good.rows + bad.rows},
    )
    text = "\n".join(lines)
    assert "camera" in lines[2] and "7" in lines[2] and "4.00 / 4.00" in lines[2]
    assert "s1 camera: exactly_once, received 2 of 2" in text
    assert "camera.webm: 2 frames decoded" in text
    assert "s2 camera: missing, received 5 of 8" in text and "missing 3: 2-3, 7" in text
    assert lines[-1] == "1 of 2 exactly once"
