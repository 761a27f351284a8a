"""A session's records besides its frames: its end, with its phases, and the browser's stats.

The tracker keeps them in ``<session_id>.session.jsonl``, in the folder of the session's CSV: one
message a line, exactly as the contract encodes it (``schemas.encode``), so that every line is
read back through the contract's own validation and a reader needs nothing but ``carom.schemas``
(or ``jq``). Two kinds come:

- ``session_end`` (truth topic): its ``phases`` are the session's phases, each with the
  parameters in force, the frames it was due and the bytes the simulator sent; the report's
  per-phase figures start there.
- ``client_stats`` (centroid topic, every 2 s): what the browser's getStats measured.

They are not frames: they never go through the join, and a CSV (``*.csv``) never holds them.

Exactly once, as the rows: the sink writes a record, fsyncs it, and only then acks its message,
so a crash loses none; a redelivery after the crash carries the very same record, which the sink
recognises by ``key`` and does not write again (``sink.CsvSink.add_record``). The key is what a
redelivery repeats and nothing else does: a ``session_end`` by when the stream ended, a
``client_stats`` by when the router received it. A session id used again later gets other times,
so its records are never taken for duplicates. The whole ``session_end`` is one record rather than
one per phase: phases only ever arrive together, in it, so one key covers all of them, and the
end's ``frames_due`` and ``reason`` are kept beside them. ``read`` deduplicates again, by the same
key: two trackers handing a session over on one volume can each have written a record once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from carom import schemas
from carom.schemas import ClientStats, PhaseSummary, SessionEnd

#: File name of a session's records: ``<session_id>`` then this (its CSV: ``<session_id>.csv``).
SUFFIX: Final = ".session.jsonl"
#: Records a reopened file is checked against (its last lines). Only records written after the
#: broker last got the acks can come back: the session's end (acked after its last row, within
#: the join window) and a stats record or two (one every 2 s per session); the sink's CSV bound
#: (20,000 rows) would make every reopen read a long session's whole file.
REMEMBERED: Final = 1000

Record = SessionEnd | ClientStats
"""What a session's records file holds."""
Key = tuple[str, int]
"""``(kind, ns)``: one record, the same in its redelivery (``key``)."""


def key(rec: Record) -> Key:
    """The record's identity: a redelivery repeats it, a new record never does."""
    if isinstance(rec, SessionEnd):
        return ("session_end", rec.t_end_ns)
    return ("client_stats", rec.t_router_recv_ns)


class _EndKey(msgspec.Struct, tag="session_end", tag_field="kind"):
    """The part of a ``session_end`` line that ``key`` reads (other fields are skipped)."""

    t_end_ns: int


class _StatsKey(msgspec.Struct, tag="client_stats", tag_field="kind"):
    """The part of a ``client_stats`` line that ``key`` reads."""

    t_router_recv_ns: int


_keys_only = msgspec.json.Decoder(_EndKey | _StatsKey)


def to_line(rec: Record) -> str:
    """One line of the file (JSON never holds a raw newline)."""
    return schemas.encode(rec).decode() + "\n"


def from_line(line: str) -> Record:
    """Parse and validate one line; a ``SchemaError`` (a ``ValueError``) names what is wrong."""
    rec = schemas.decode_any(line)
    if not isinstance(rec, SessionEnd | ClientStats):
        raise schemas.SchemaError(f"not a session record: kind {type(rec).__name__}")
    return rec


def keys(text: str) -> Iterator[Key]:
    """The keys of the records in ``text`` (the tail of a file: whole lines).

    Only the key is decoded, not the record (a reopened file is read on the join thread); a line
    without one is skipped: the sink only needs to recognise what it wrote.
    """
    for line in text.splitlines():
        try:
            k = _keys_only.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(k, _EndKey):
            yield ("session_end", k.t_end_ns)
        else:
            yield ("client_stats", k.t_router_recv_ns)


def path_for(csv_path: Path) -> Path:
    """The records file of the session whose CSV is ``csv_path``."""
    return csv_path.with_name(csv_path.name.removesuffix(".csv") + SUFFIX)


@dataclass
class SessionRecords:
    """One session's records as read back: each once, in order."""

    ends: list[SessionEnd] = field(default_factory=list)
    "By ``t_end_ns``; more than one only for a second end (e.g. a session id used again)."
    stats: list[ClientStats] = field(default_factory=list)
    "By ``t_router_recv_ns``."
    duplicates: int = 0
    "Records read twice (the same key) and kept once."
    torn: bool = False
    "The last line was cut short (the tracker died writing it; never acked) and is left out."

    @property
    def phases(self) -> list[PhaseSummary]:
        """The session's phases, from its last end (empty: no end yet, or none recorded)."""
        return list(self.ends[-1].phases) if self.ends else []


def read(paths: Iterable[Path]) -> SessionRecords:
    """Every record of one session's files once (first wins); a missing file has none.

    A bad line raises ``ValueError`` naming the file and line. The last line without its newline
    is torn, not bad: the tracker cuts it off itself when it next opens the file.
    """
    out = SessionRecords()
    seen: set[Key] = set()
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        lines = text.split("\n")
        out.torn = out.torn or bool(lines[-1])
        for number, line in enumerate(lines[:-1], start=1):
            if not line:
                continue
            try:
                rec = from_line(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            k = key(rec)
            if k in seen:
                out.duplicates += 1
                continue
            seen.add(k)
            if isinstance(rec, SessionEnd):
                out.ends.append(rec)
            else:
                out.stats.append(rec)
    out.ends.sort(key=lambda e: e.t_end_ns)
    out.stats.sort(key=lambda s: s.t_router_recv_ns)
    return out
