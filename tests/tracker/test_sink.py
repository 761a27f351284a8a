"""The CSV sink: rows are on disk (fsynced) before their messages are acked; open files bounded."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from carom import schemas
from carom_tracker import csvrow
from carom_tracker.join import Joiner, Result
from carom_tracker.sink import CsvSink


def results(sessions: int, frames: int) -> list[Result]:
    j = Joiner(window_ns=10)
    out: list[Result] = []
    for f in range(frames):
        for s in range(sessions):
            sid = f"s{s}"
            t = schemas.Truth(session_id=sid, frame=f, rtp_ts=f * 3000, x=10.0, y=20.0,
                              t_render_ns=1_000 + f)  # fmt: skip
            c = schemas.Centroid(session_id=sid, rtp_ts=f * 3000, detected=True, x=13.0, y=24.0,
                                 t_router_recv_ns=2_000 + f, t_published_ns=2_100 + f)  # fmt: skip
            j.add_truth(t, 5_000, ("t", sid, f))
            out.extend(j.add_report(c, 5_000, ("r", sid, f)).results)
    return out


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def fsync(self, fd: int) -> None:
        self.events.append(("fsync", fd))

    def ack(self, tokens: Iterable[object]) -> None:
        self.events.extend(("ack", t) for t in tokens)


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_rows_are_durable_before_their_acks(tmp_path: Path) -> None:
    rec = Recorder()
    sink = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    rs = results(3, 4)
    for r in rs:
        sink.add(r, r.tokens)
    sink.defer_ack(["dup"])
    assert rec.events == []  # nothing acked (nor synced) before the commit
    assert sink.commit() == 2 * len(rs) + 1
    kinds = [k for k, _ in rec.events]
    assert kinds == ["fsync"] * 3 + ["ack"] * (2 * len(rs) + 1)
    assert [t for k, t in rec.events if k == "ack"][-1] == "dup"
    # every row is in its file (flushed) by the time the first ack goes out
    for s in range(3):
        rows = read(tmp_path / f"s{s}.csv")
        assert [csvrow.from_row(r).frame for r in rows] == [0, 1, 2, 3]
        assert list(rows[0]) == list(csvrow.COLUMNS)
    rec.events.clear()
    assert sink.commit() == 0
    assert rec.events == []  # nothing dirty: no fsync, no ack


def test_open_files_are_bounded_and_reopened_files_get_no_second_header(tmp_path: Path) -> None:
    rec = Recorder()
    sink = CsvSink(tmp_path, rec.ack, max_open=2, fsync=rec.fsync)
    rs = results(5, 3)
    for r in rs:
        sink.add(r, r.tokens)
        assert sink.open_files <= 2
    # files closed early were fsynced on eviction; nothing is acked before the commit
    assert rec.events and all(k == "fsync" for k, _ in rec.events)
    sink.close()
    assert sink.open_files == 0
    assert rec.events[-1][0] == "ack"
    assert sink.files_opened == 15  # round-robin over 5 sessions with 2 slots: every add reopens
    for s in range(5):
        rows = read(tmp_path / f"s{s}.csv")
        assert [r["frame"] for r in rows] == ["0", "1", "2"]
    # a new sink (a restart) appends to the same files
    again = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    again.add(rs[0], rs[0].tokens)
    again.close()
    assert [r["frame"] for r in read(tmp_path / "s0.csv")] == ["0", "1", "2", "0"]
