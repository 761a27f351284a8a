"""Per-session CSV files whose rows are made durable before their messages are acknowledged.

``add`` writes a row (buffered) and remembers the row's ack tokens; ``commit`` flushes and fsyncs
every file written since the last commit and only then hands the tokens to ``ack``. A crash between
the write and the commit loses no frame: the messages were never acked, so the broker redelivers
them and the next run writes the row again (a possible duplicate, which the report dedupes).

Open files are bounded (least recently written closed first); a file closed early is flushed and
fsynced on the way out, so its rows are already durable when the commit acks them.
"""

from __future__ import annotations

import csv
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from carom_tracker import csvrow

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _File:
    __slots__ = ("dirty", "handle", "writer")

    def __init__(self, path: Path) -> None:
        new = not path.exists() or path.stat().st_size == 0
        self.handle: IO[str] = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer: Any = csv.writer(self.handle, lineterminator="\n")
        self.dirty = False
        if new:
            self.writer.writerow(csvrow.COLUMNS)
            self.dirty = True


class CsvSink:
    """Rows to ``<directory>/<session_id>.csv``; acks only after the rows are on disk."""

    def __init__(
        self,
        directory: Path,
        ack: Callable[[Iterable[object]], None],
        *,
        max_open: int = 64,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        if max_open < 1:
            raise ValueError("`max_open` must be at least 1")
        self.directory = directory
        self._ack = ack
        self._fsync = fsync
        self._max_open = max_open
        self._files: OrderedDict[str, _File] = OrderedDict()
        self._tokens: list[object] = []
        self.rows_written = 0
        self.rows_durable = 0
        self.pending_rows = 0
        self.files_opened = 0
        self.commits = 0
        self.acked = 0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def open_files(self) -> int:
        return len(self._files)

    def add(self, row: csvrow.RowSource, tokens: Iterable[object] = ()) -> None:
        """Write one row (not yet durable); its tokens are acked by the next ``commit``."""
        f = self._file(row.session_id)
        f.writer.writerow(csvrow.to_row(row))
        f.dirty = True
        self.rows_written += 1
        self.pending_rows += 1
        self._tokens.extend(tokens)

    def defer_ack(self, tokens: Iterable[object]) -> None:
        """Tokens with no row that must still wait for the commit (keeps acks in order)."""
        self._tokens.extend(tokens)

    def commit(self) -> int:
        """Flush + fsync every file written since the last commit, then ack; tokens acked."""
        for f in self._files.values():
            if f.dirty:
                self._sync(f)
        tokens, self._tokens = self._tokens, []
        self.rows_durable += self.pending_rows
        self.pending_rows = 0
        self.commits += 1
        if tokens:
            self._ack(tokens)
            self.acked += len(tokens)
        return len(tokens)

    def close(self) -> None:
        """Commit what is written and close every file."""
        self.commit()
        for f in self._files.values():
            f.handle.close()
        self._files.clear()

    def _sync(self, f: _File) -> None:
        f.handle.flush()
        self._fsync(f.handle.fileno())
        f.dirty = False

    def _file(self, session_id: str) -> _File:
        f = self._files.get(session_id)
        if f is not None:
            self._files.move_to_end(session_id)
            return f
        if not _SAFE.match(session_id):  # schemas already enforce this; never escape the folder
            raise ValueError(f"unsafe session id for a file name: {session_id!r}")
        while len(self._files) >= self._max_open:
            _, old = self._files.popitem(last=False)
            if old.dirty:
                self._sync(old)
            old.handle.close()
        f = self._files[session_id] = _File(self.directory / f"{session_id}.csv")
        self.files_opened += 1
        return f
