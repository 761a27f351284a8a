"""A session's files for one type, under ``<out_dir>/<session_id>/``:

- ``<type>.latency.csv``: one row per message written (``ledger.COLUMNS``). The record of what
  is written: a restart rebuilds which sequence numbers it has from here, so a redelivered
  message is not written twice. Rows are written only after their data is fsynced.
- ``<type>.duplicates.csv``: each copy dropped as a duplicate (seq, message id, consumed at).
- ``<type>.chunks`` (video, audio, bytes): the chunks as they came, append-only, each as a
  ``carom.channels`` wire frame (type, seq, capture time, meta, payload), so the media file can be
  muxed at the end, in sequence order, and again after a crash.
- ``<type>.jsonl`` (text): one JSON object per message (seq, capture times, text).
- ``<type>/<seq>.npy`` (points): one float32 ``(count, 3)`` array per message.
- ``<type>.webm`` / ``.mkv`` / ``.ogg``: the media file, muxed when the type ends
  (``carom_runtime.media``), and ``<type>.summary.json``: the verdict (``ledger.Ledger.summary``).

A crash can leave a torn last record in any append-only file: the CSV is cut back to its last
whole line and the chunk store to its last whole frame when they are reopened. Data written
whose row never was (a crash between the two) is written again on redelivery: the chunk store
(and a chat's ``.jsonl``) may then hold a sequence number twice; the muxer keeps its first copy,
and so should any reader of the ``.jsonl`` (the CSV, which counts, never holds one twice).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from carom.channels import (
    ChannelError,
    ChannelMessage,
    Format,
    Frame,
    encode_frame,
    parse_body,
    parse_head,
)
from carom_recorder.ledger import COLUMNS, Row, RowError
from carom_runtime import media


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[Row]:
    """The rows of a latency CSV; a torn last line is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole != len(data):
        with open(path, "r+b") as f:
            f.truncate(whole)
    rows: list[Row] = []
    for i, cells in enumerate(csv.reader(io.StringIO(data[:whole].decode("utf-8", "replace")))):
        if i == 0 and cells and cells[0] == COLUMNS[0]:
            continue
        try:
            rows.append(Row.parse(cells))
        except RowError:
            continue  # a line no recorder wrote whole: its message was never acked
    return rows


def read_duplicates(path: Path) -> list[int]:
    if not path.exists():
        return []
    out: list[int] = []
    for line in path.read_text(errors="replace").splitlines()[1:]:
        head = line.split(",", 1)[0]
        if head.isdigit():
            out.append(int(head))
    return out


def read_chunks(path: Path, truncate: bool = False) -> list[Frame]:
    """The frames of a chunk store, in file order; a torn tail is ignored (or cut off)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    at, out = 0, []
    while at < len(data):
        try:
            parsed = parse_head(data, at)
        except ChannelError:
            break
        if parsed is None:
            break
        head, body_at = parsed
        if body_at + head.length > len(data):
            break
        try:
            out.append(parse_body(head, memoryview(data)[body_at : body_at + head.length]))
        except ChannelError:
            break
        at = body_at + head.length
    if truncate and at != len(data):
        with open(path, "r+b") as f:
            f.truncate(at)
    return out


def first_of_each(frames: list[Frame]) -> list[Frame]:
    """One frame per sequence number (its first copy), in sequence order."""
    seen: dict[int, Frame] = {}
    for frame in frames:
        seen.setdefault(frame.seq, frame)
    return [seen[s] for s in sorted(seen)]


class TypeFiles:
    """The open files of one session's type (used by one consumer thread only)."""

    def __init__(self, out_dir: Path, session_id: str, type_: str, fmt: Format) -> None:
        self.dir = out_dir / session_id
        self.type = type_
        self.format = fmt
        self.csv_path = self.dir / f"{type_}.latency.csv"
        self.dup_path = self.dir / f"{type_}.duplicates.csv"
        self.chunk_path = self.dir / f"{type_}.chunks"
        self.text_path = self.dir / f"{type_}.jsonl"
        self.points_dir = self.dir / type_
        self.summary_path = self.dir / f"{type_}.summary.json"
        self._csv: IO[str] | None = None
        self._dups: IO[str] | None = None
        self._data: IO[bytes] | None = None
        self._dirty_dirs: set[Path] = set()

    def load(self) -> tuple[list[Row], list[int]]:
        """What an earlier run wrote (rows, duplicate seqs); repairs torn tails first."""
        rows = read_rows(self.csv_path)
        if self.format in ("video", "audio", "bytes"):
            read_chunks(self.chunk_path, truncate=True)
        return rows, read_duplicates(self.dup_path)

    def _open_text(self, path: Path, header: str) -> IO[str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        f = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - kept open
        if new:
            f.write(header + "\n")
            self._dirty_dirs.add(self.dir)
        return f

    def write_data(self, msg: ChannelMessage) -> None:
        """The message's own bytes, in its format's file (not yet durable: ``sync_data``)."""
        if self.format == "points":
            self.points_dir.mkdir(parents=True, exist_ok=True)
            array = np.frombuffer(msg.payload, dtype="<f4").reshape(-1, 3)
            path = self.points_dir / f"{msg.seq:09d}.npy"
            with open(path, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
            self._dirty_dirs.update((self.points_dir, self.dir))
            return
        if self._data is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.text_path if self.format == "text" else self.chunk_path
            if not path.exists():
                self._dirty_dirs.add(self.dir)
            self._data = open(path, "ab")  # noqa: SIM115 - kept open
        if self.format == "text":
            line = {
                "seq": msg.seq,
                "t_capture_ms": None if msg.t_capture_ms != msg.t_capture_ms else msg.t_capture_ms,
                "t_capture_ns": msg.t_capture_ns,
                "text": msg.payload.decode("utf-8", "replace"),
            }
            self._data.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        else:
            self._data.write(
                encode_frame(msg.type, msg.seq, msg.t_capture_ms, msg.payload, msg.meta)
            )

    def sync_data(self) -> None:
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())
        for d in self._dirty_dirs:
            fsync_dir(d)
        self._dirty_dirs.clear()

    def write_row(self, row: Row) -> None:
        if self._csv is None:
            self._csv = self._open_text(self.csv_path, ",".join(COLUMNS))
        csv.writer(self._csv, lineterminator="\n").writerow(row.cells())

    def write_duplicate(self, seq: int, message_id: str, t_consumed_ns: int) -> None:
        if self._dups is None:
            self._dups = self._open_text(self.dup_path, "seq,message_id,t_consumed_ns")
        self._dups.write(f"{seq},{message_id},{t_consumed_ns}\n")

    def sync_rows(self) -> None:
        for f in (self._csv, self._dups):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        for d in self._dirty_dirs:
            fsync_dir(d)
        self._dirty_dirs.clear()

    def close(self) -> None:
        for f in (self._csv, self._dups, self._data):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._csv = self._dups = self._data = None

    # -- at the end ---------------------------------------------------------------------------

    def write_media(self) -> dict[str, Any] | None:
        """Mux the chunk store into the type's media file; what the summary says of it."""
        if self.format not in ("video", "audio"):
            return None
        if self._data is not None:
            self._data.flush()
        frames = first_of_each(read_chunks(self.chunk_path))
        if not frames:
            return {"file": None, "chunks": 0, "error": "no chunks"}
        meta = frames[0].meta
        codec = str(meta.get("codec", ""))
        chunks = [
            media.Chunk(
                f.payload,
                int(f.meta.get("timestamp_us", 0)),
                bool(f.meta.get("key", True)),
                f.meta.get("duration_us") if isinstance(f.meta.get("duration_us"), int) else None,
            )
            for f in frames
        ]
        if self.format == "video":
            suffix = media.VIDEO_SUFFIX.get(codec, ".mkv")
        else:
            suffix = media.AUDIO_SUFFIX.get(codec, ".ogg")
        final = self.dir / f"{self.type}{suffix}"
        tmp = self.dir / f".{self.type}.tmp{suffix}"
        out: dict[str, Any] = {"file": final.name, "codec": codec, "chunks": len(chunks)}
        try:
            if self.format == "video":
                written = media.write_video(chunks, codec, tmp)
            else:
                written = media.write_opus(
                    chunks, tmp, int(meta.get("sample_rate", 48_000)), int(meta.get("channels", 1))
                )
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.dir)
            out["packets"] = written.packets
            out["skipped_before_keyframe"] = written.skipped
            out["decoded_frames"] = media.count_frames(final, self.format)
        except Exception as exc:  # any codec failure is reported in the summary, never a crash
            tmp.unlink(missing_ok=True)
            out["file"] = final.name if final.exists() else None
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.type}.summary.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.summary_path)
        fsync_dir(self.dir)
