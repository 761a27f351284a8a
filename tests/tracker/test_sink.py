"""The CSV sink: rows are on disk (fsynced) before their messages are acked; open files bounded."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterable
from pathlib import Path

from msgspec.structs import replace

from carom import schemas
from carom_tracker import csvrow, records
from carom_tracker import sink as sink_module
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
    # a new sink (a restart) appends to the same files, without a second header
    again = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    more = results(1, 4)[-1]
    assert again.add(more, more.tokens)
    again.close()
    assert [r["frame"] for r in read(tmp_path / "s0.csv")] == ["0", "1", "2", "3"]


def test_a_restart_skips_frames_already_in_the_file_and_still_acks_them(tmp_path: Path) -> None:
    rec = Recorder()
    rs = results(2, 5)
    first = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    for r in rs[:6]:  # frames 0-2 of both sessions
        assert first.add(r, r.tokens)
    first.close()
    rec.events.clear()
    again = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    written = [again.add(r, r.tokens) for r in rs]  # redelivered 0-2, then new 3-4
    assert written == [False] * 6 + [True] * 4
    assert again.duplicates_skipped == 6 and again.rows_written == 4
    assert again.add(rs[-1], ("late",)) is False  # within one run too
    again.close()
    assert len([k for k, _ in rec.events if k == "ack"]) == 2 * len(rs) + 1
    for s in range(2):
        assert [r["frame"] for r in read(tmp_path / f"s{s}.csv")] == ["0", "1", "2", "3", "4"]


def test_a_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    rec = Recorder()
    rs = results(1, 3)
    sink = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    sink.add(rs[0], rs[0].tokens)
    sink.close()
    path = tmp_path / "s0.csv"
    whole = path.read_bytes()
    with path.open("ab") as fh:  # killed mid-write: half of frame 1's row, never acked
        fh.write(whole.splitlines(keepends=True)[-1][:40].replace(b"s0,0,", b"s0,1,"))
    again = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    for r in rs:
        again.add(r, r.tokens)
    again.close()
    assert [r["frame"] for r in read(path)] == ["0", "1", "2"]
    assert path.read_bytes().startswith(whole)


def test_a_torn_header_starts_the_file_again(tmp_path: Path) -> None:
    (tmp_path / "s0.csv").write_text("session_id,fra")
    sink = CsvSink(tmp_path, Recorder().ack)
    rs = results(1, 1)
    sink.add(rs[0], rs[0].tokens)
    sink.close()
    rows = read(tmp_path / "s0.csv")
    assert [r["frame"] for r in rows] == ["0"] and list(rows[0]) == list(csvrow.COLUMNS)


def test_the_dedupe_memory_is_bounded_and_read_back_from_the_tail(tmp_path: Path) -> None:
    rs = results(1, 50)
    sink = CsvSink(tmp_path, Recorder().ack, dedupe_rows=10)
    for r in rs:
        sink.add(r, r.tokens)
    sink.close()
    again = CsvSink(tmp_path, Recorder().ack, dedupe_rows=10)
    assert [again.add(r) for r in rs[40:]] == [False] * 10  # the last 10 rows, read back
    assert [again.add(r) for r in rs[38:40]] == [True] * 2
    f = again._files["s0.csv"]
    assert len(f.frames) == len(f.order) == 10
    again.close()


def test_a_session_stays_in_the_run_folder_where_it_started(tmp_path: Path) -> None:
    rs = results(2, 4)
    old = CsvSink(tmp_path / "run1", Recorder().ack, earlier_runs=tmp_path)
    for r in rs[:4]:  # frames 0-1 of s0 and s1
        old.add(r, r.tokens)
    old.close()
    new = CsvSink(tmp_path / "run2", Recorder().ack, earlier_runs=tmp_path)
    for r in rs:
        new.add(r, r.tokens)
    new.add(results(3, 1)[2])  # a session new in this run
    new.close()
    assert sorted(p.name for p in (tmp_path / "run2").glob("*.csv")) == ["s2.csv"]
    for s in range(2):
        assert [r["frame"] for r in read(tmp_path / "run1" / f"s{s}.csv")] == ["0", "1", "2", "3"]


def test_a_session_id_used_again_later_is_a_new_session(tmp_path: Path) -> None:
    """Same id, same frame numbers, other render times: nothing skipped, and after ADOPT_S a
    new file in the new run's folder."""
    rs = results(1, 3)
    old = CsvSink(tmp_path / "run1", Recorder().ack, earlier_runs=tmp_path)
    for r in rs:
        old.add(r, r.tokens)
    old.close()
    again = [replace(r, t_render_ns=(r.t_render_ns or 0) + 10**12) for r in rs]
    aged = time.time() - sink_module.ADOPT_S - 5
    os.utime(tmp_path / "run1" / "s0.csv", (aged, aged))
    new = CsvSink(tmp_path / "run2", Recorder().ack, earlier_runs=tmp_path)
    assert [new.add(r, r.tokens) for r in again] == [True] * 3
    new.close()
    assert [r["frame"] for r in read(tmp_path / "run2" / "s0.csv")] == ["0", "1", "2"]
    assert len(read(tmp_path / "run1" / "s0.csv")) == 3


def _end(sid: str, t_end_ns: int) -> schemas.SessionEnd:
    return schemas.SessionEnd(session_id=sid, frames_due=4, t_end_ns=t_end_ns)


def _stats(sid: str, t_ns: int) -> schemas.ClientStats:
    return schemas.ClientStats(session_id=sid, t_router_recv_ns=t_ns, fps=30.0)


def test_records_are_durable_before_their_acks_and_beside_the_csv(tmp_path: Path) -> None:
    rec = Recorder()
    sink = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    (r,) = results(1, 1)
    sink.add(r, r.tokens)
    assert sink.add_record(_stats("s0", 5_000), ["stats"])
    assert sink.add_record(_end("s0", 9_000))  # the end's own token comes with the join's
    assert rec.events == []
    sink.commit()
    assert [k for k, _ in rec.events] == ["fsync", "fsync", "ack", "ack", "ack"]
    assert [t for k, t in rec.events if k == "ack"][-1] == "stats"
    sink.close()
    lines = (tmp_path / "s0.session.jsonl").read_text().splitlines()
    assert [schemas.decode_any(line) for line in lines] == [_stats("s0", 5_000), _end("s0", 9_000)]
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["s0.csv"]  # no record in a CSV
    assert (sink.records_written, sink.records_skipped) == (2, 0)


def test_a_redelivered_record_is_written_once_and_still_acked(tmp_path: Path) -> None:
    rec = Recorder()
    first = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)
    assert first.add_record(_stats("s0", 5_000), ["a"])
    assert not first.add_record(_stats("s0", 5_000), ["a again"])  # within one run
    assert first.add_record(_end("s0", 9_000))
    first.close()
    path = tmp_path / "s0.session.jsonl"
    with path.open("a") as fh:  # killed mid-write of the next record: never acked
        fh.write('{"kind":"client_stats","schema_ver')
    rec.events.clear()
    again = CsvSink(tmp_path, rec.ack, fsync=rec.fsync)  # a restart: redelivered, then new
    written = [
        again.add_record(_stats("s0", 5_000), ["b"]),
        again.add_record(_end("s0", 9_000), ["c"]),
        again.add_record(_stats("s0", 7_000), ["d"]),
    ]
    assert written == [False, False, True]
    assert (again.records_written, again.records_skipped) == (1, 2)
    again.close()
    assert [t for k, t in rec.events if k == "ack"] == ["b", "c", "d"]
    got = [schemas.decode_any(line) for line in path.read_text().splitlines()]
    assert got == [_stats("s0", 5_000), _end("s0", 9_000), _stats("s0", 7_000)]


def test_records_follow_a_session_into_the_run_folder_where_it_started(tmp_path: Path) -> None:
    rs = results(1, 2)
    old = CsvSink(tmp_path / "run1", Recorder().ack, earlier_runs=tmp_path)
    old.add(rs[0], rs[0].tokens)
    old.close()
    new = CsvSink(tmp_path / "run2", Recorder().ack, earlier_runs=tmp_path)
    new.add_record(_stats("s0", 5_000))
    new.add(rs[1], rs[1].tokens)
    new.close()
    assert (tmp_path / "run1" / "s0.session.jsonl").exists()
    assert not list((tmp_path / "run2").iterdir())


def test_a_csv_begun_by_an_older_tracker_is_continued_in_its_layout(tmp_path: Path) -> None:
    """Rows cut to its header (no second header, no shifted cells); a restart still knows them."""
    rs = results(1, 3)
    old_columns = csvrow.COLUMNS[:-3]
    path = tmp_path / "s0.csv"
    cut = [",".join(csvrow.to_row(r)[: len(old_columns)]) + "\n" for r in rs[:1]]
    path.write_text(",".join(old_columns) + "\n" + "".join(cut))
    sink = CsvSink(tmp_path, Recorder().ack)
    assert [sink.add(r, r.tokens) for r in rs] == [False, True, True]  # frame 0: a redelivery
    sink.close()
    again = CsvSink(tmp_path, Recorder().ack)
    assert [again.add(r) for r in rs] == [False] * 3
    again.close()
    rows = read(path)
    assert all(len(r) == len(old_columns) and None not in r for r in rows)
    assert [(row.frame, row.phase) for row in map(csvrow.from_row, rows)] == [
        (0, 0),
        (1, 0),
        (2, 0),
    ]


def test_a_reopened_records_file_remembers_its_last_records_only(tmp_path: Path) -> None:
    """Only the last records can be redelivered; reading a long session's whole file on every
    reopen would cost the join thread for nothing."""
    n = records.REMEMBERED + 5
    sink = CsvSink(tmp_path, Recorder().ack)
    for t in range(n):
        sink.add_record(_stats("s0", 1_000 + t))
    sink.close()
    again = CsvSink(tmp_path, Recorder().ack)
    assert not again.add_record(_stats("s0", 1_000 + n - 1))  # the last ones are known
    f = again._files["s0.session.jsonl"]
    assert len(f.frames) == len(f.order) == records.REMEMBERED
    again.close()
