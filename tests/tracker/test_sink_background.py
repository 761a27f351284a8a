"""The CSV sink's background commits: fsyncs and acks off the caller's thread, still in order."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from carom_tracker.sink import CsvSink
from tests.tracker.test_sink import read, results


class Slow:
    """Records fsyncs and acks in order; fsync waits on ``gate`` (a slow disk)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def fsync(self, fd: int) -> None:
        assert self.gate.wait(10)
        if self.fail:
            raise OSError(5, "Input/output error")
        self.events.append(("fsync", fd))

    def ack(self, tokens: Iterable[object]) -> None:
        self.events.extend(("ack", t) for t in tokens)


def test_commit_returns_before_the_fsync_and_acks_follow_it(tmp_path: Path) -> None:
    rec = Slow()
    sink = CsvSink(tmp_path, rec.ack, fsync=rec.fsync, background=True)
    rs = results(3, 2)
    for r in rs:
        sink.add(r, r.tokens)
    rec.gate.clear()
    assert sink.commit() == 2 * len(rs)  # handed on while the disk is still busy
    assert rec.events == []
    # the rows are in their files (flushed) before any fsync or ack
    assert all(len(read(tmp_path / f"s{s}.csv")) == 2 for s in range(3))
    for r in results(1, 3)[2:]:
        sink.add(r, r.tokens)
    sink.defer_ack(["last"])
    rec.gate.set()
    sink.close()  # waits for both commits
    kinds = [k for k, _ in rec.events]
    assert kinds == ["fsync"] * 3 + ["ack"] * (2 * len(rs)) + ["fsync"] + ["ack"] * 3
    assert rec.events[-1] == ("ack", "last")
    assert sink.rows_durable == sink.rows_written == len(rs) + 1
    assert sink.acked == 2 * len(rs) + 3


def test_a_failed_fsync_acks_nothing_and_is_raised_by_the_next_commit(tmp_path: Path) -> None:
    rec = Slow()
    rec.fail = True
    sink = CsvSink(tmp_path, rec.ack, fsync=rec.fsync, background=True)
    for r in results(2, 1):
        sink.add(r, r.tokens)
    sink.commit()
    with pytest.raises(OSError):
        sink.close()
    assert rec.events == []
    assert sink.acked == 0 and sink.rows_durable == 0
