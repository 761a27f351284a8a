"""The recorder's accounting, pure: what one session sent of one type, what arrived, what is owed.

A ``Ledger`` per (session, type) admits each ``ChannelMessage`` by its sequence number: the first
copy is written, a second copy of the same Pulsar message (a redelivery: the recorder died or
restarted before acking it) is skipped quietly, and a copy from another publish (the router
resent a message the broker had taken after all, or anything else that put it on the topic
twice) is a *duplicate*: dropped, counted and named. Every written message has one latency row
(``Row``: the CSV's columns and the hops derived from its timestamps).

When the router's ``ChannelEnd`` for the type arrives, ``Ledger.verdict`` checks every sequence
number from 0 to its ``last_seq``: received exactly once, or listed as refused or failed by the
router; any other is *missing* and named. ``summary`` is what lands in ``<type>.summary.json``,
and ``report_lines`` what ``carom-recorder report`` prints.

Everything here takes its inputs as arguments (times too): no files, no clock, no broker.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from carom.channels import ChannelEnd, ChannelMessage

#: The latency CSV's columns, in order (one row per message written).
COLUMNS: Final = (
    "type",
    "seq",
    "bytes",
    "message_id",
    "t_capture_ns",
    "t_router_recv_ns",
    "t_published_ns",
    "t_consumed_ns",
    "capture_to_router_ms",
    "router_to_published_ms",
    "published_to_consumed_ms",
    "capture_to_consumed_ms",
)
#: The hops, each (name, from, to) over the row's timestamps.
HOPS: Final = (
    ("capture_to_router", "t_capture_ns", "t_router_recv_ns"),
    ("router_to_published", "t_router_recv_ns", "t_published_ns"),
    ("published_to_consumed", "t_published_ns", "t_consumed_ns"),
    ("capture_to_consumed", "t_capture_ns", "t_consumed_ns"),
)
HOP_NAMES: Final = tuple(h[0] for h in HOPS)
#: Sequence numbers a summary names at most per list (the counts are always whole).
MAX_NAMED: Final = 1000


class RowError(ValueError):
    """A CSV line that is not a row (a torn last line after a crash)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One written message: its sequence number, size, Pulsar id and the four timestamps (ns).

    ``t_capture_ns`` is None when the router could not convert the client's capture time (no
    clock offset yet, or the client sent NaN): the hops from capture are then empty cells.
    """

    type: str
    seq: int
    bytes: int
    message_id: str
    t_capture_ns: int | None
    t_router_recv_ns: int
    t_published_ns: int
    t_consumed_ns: int

    @classmethod
    def of(cls, msg: ChannelMessage, message_id: str, t_consumed_ns: int) -> Row:
        return cls(
            msg.type,
            msg.seq,
            len(msg.payload),
            message_id,
            msg.t_capture_ns,
            msg.t_router_recv_ns,
            msg.t_published_ns,
            t_consumed_ns,
        )

    def hops(self) -> dict[str, float | None]:
        """Each hop in ms, None when an end is unknown. Signed: a negative one shows a bad
        clock offset, which a clamp to 0 would hide."""
        out: dict[str, float | None] = {}
        for name, start, end in HOPS:
            a, b = getattr(self, start), getattr(self, end)
            out[name] = None if a is None or b is None else (b - a) / 1e6
        return out

    def cells(self) -> list[str]:
        hops = self.hops()
        return [
            self.type,
            str(self.seq),
            str(self.bytes),
            self.message_id,
            "" if self.t_capture_ns is None else str(self.t_capture_ns),
            str(self.t_router_recv_ns),
            str(self.t_published_ns),
            str(self.t_consumed_ns),
            *("" if hops[h] is None else f"{hops[h]:.3f}" for h in HOP_NAMES),
        ]

    @classmethod
    def parse(cls, cells: Sequence[str]) -> Row:
        if len(cells) != len(COLUMNS):
            raise RowError(f"{len(cells)} cells, not {len(COLUMNS)}")
        try:
            return cls(
                cells[0],
                int(cells[1]),
                int(cells[2]),
                cells[3],
                int(cells[4]) if cells[4] else None,
                int(cells[5]),
                int(cells[6]),
                int(cells[7]),
            )
        except ValueError as exc:
            raise RowError(str(exc)) from None


class Outcome(enum.Enum):
    WRITE = "write"
    "The first copy: write it, then its row."
    REDELIVERED = "redelivered"
    "The same Pulsar message again (written before, not yet acked): skip, ack."
    DUPLICATE = "duplicate"
    "Another publish of a sequence number already written: drop, count, ack."


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation (NumPy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    lo = math.floor(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def latency_stats(rows: Iterable[Row]) -> dict[str, dict[str, float | int | None]]:
    """Per hop: how many rows have it, p50 and p99 (ms, 3 decimals)."""
    per: dict[str, list[float]] = {h: [] for h in HOP_NAMES}
    for row in rows:
        for name, value in row.hops().items():
            if value is not None:
                per[name].append(value)
    out: dict[str, dict[str, float | int | None]] = {}
    for name, values in per.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        out[name] = {
            "count": len(values),
            "p50_ms": None if p50 is None else round(p50, 3),
            "p99_ms": None if p99 is None else round(p99, 3),
        }
    return out


def _ranges(seqs: Iterable[int]) -> str:
    """``0-3, 7, 9-10``: sequence numbers as runs, for a line a person reads."""
    out: list[str] = []
    ordered = sorted(set(seqs))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(out)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One type of one session checked against the router's ``ChannelEnd`` (or without it)."""

    status: str
    """``exactly_once``; ``missing`` (some sequence number neither arrived nor was refused or
    failed); ``no_end`` (no ChannelEnd yet: finalized after a silence, so nothing is proven)."""
    received: int
    expected: int | None
    "Sequence numbers 0..last_seq the router did not refuse or fail (None without its end)."
    missing: tuple[int, ...]
    unexpected: tuple[int, ...]
    "Received, but beyond the end's last_seq or listed as refused/failed: the end disagrees."
    refused: int
    failed: int
    unlisted_refusals: int
    "Refusals the end counted but did not list (over ``MAX_LISTED_SEQS``)."

    @property
    def ok(self) -> bool:
        return self.status == "exactly_once"


@dataclass
class Ledger:
    """One session's messages of one type: admitted once each, rows kept for latency."""

    session_id: str
    type: str
    seen: dict[int, str] = field(default_factory=dict)
    "seq -> the Pulsar message id it was written from."
    duplicates: dict[int, int] = field(default_factory=dict)
    "seq -> extra copies dropped."
    redelivered: int = 0
    rows: list[Row] = field(default_factory=list)
    end: ChannelEnd | None = None
    bytes: int = 0

    def admit(self, seq: int, message_id: str) -> Outcome:
        """Decide the fate of a message; the first copy counts as seen from here on."""
        have = self.seen.get(seq)
        if have is None:
            self.seen[seq] = message_id
            return Outcome.WRITE
        if have == message_id:
            self.redelivered += 1
            return Outcome.REDELIVERED
        self.duplicates[seq] = self.duplicates.get(seq, 0) + 1
        return Outcome.DUPLICATE

    def forget(self, seq: int) -> None:
        """Undo ``admit``'s WRITE when the write itself failed (it is redelivered)."""
        self.seen.pop(seq, None)

    def written(self, row: Row) -> None:
        self.rows.append(row)
        self.bytes += row.bytes

    def restore(self, rows: Iterable[Row], duplicate_seqs: Iterable[int]) -> None:
        """Rebuild from the files of an earlier run: rows written, duplicates dropped."""
        for row in rows:
            if row.seq not in self.seen:
                self.seen[row.seq] = row.message_id
                self.written(row)
        for seq in duplicate_seqs:
            self.duplicates[seq] = self.duplicates.get(seq, 0) + 1

    @property
    def duplicate_count(self) -> int:
        return sum(self.duplicates.values())

    def gaps(self) -> list[int]:
        """Sequence numbers below the highest received that have not arrived (yet)."""
        if not self.seen:
            return []
        top = max(self.seen)
        return [s for s in range(top + 1) if s not in self.seen]

    def verdict(self) -> Verdict:
        end = self.end
        received = len(self.seen)
        if end is None:
            return Verdict("no_end", received, None, tuple(self.gaps()), (), 0, 0, 0)
        refused, failed = set(end.refused_seqs), set(end.failed_seqs)
        top = end.last_seq
        missing = tuple(
            s for s in range(top + 1) if s not in self.seen and s not in refused | failed
        )
        unexpected = tuple(sorted(s for s in self.seen if s > top or s in refused or s in failed))
        expected = top + 1 - len({s for s in refused | failed if 0 <= s <= top})
        ok = not missing and not unexpected and received == end.accepted
        return Verdict(
            "exactly_once" if ok else "missing",
            received,
            expected,
            missing,
            unexpected,
            end.refused,
            len(end.failed_seqs),
            max(0, end.refused - len(end.refused_seqs)),
        )

    def summary(self, media: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``<type>.summary.json``: counts, the verdict, the named seqs, latency per hop."""
        v = self.verdict()
        end = self.end
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "type": self.type,
            "verdict": v.status,
            "exactly_once": v.ok,
            "received": v.received,
            "expected": v.expected,
            "accepted_by_router": None if end is None else end.accepted,
            "last_seq": None if end is None else end.last_seq,
            "refused": v.refused,
            "failed": v.failed,
            "unlisted_refusals": v.unlisted_refusals,
            "missing": len(v.missing),
            "missing_seqs": list(v.missing[:MAX_NAMED]),
            "unexpected_seqs": list(v.unexpected[:MAX_NAMED]),
            "duplicates_dropped": self.duplicate_count,
            "duplicate_seqs": sorted(self.duplicates)[:MAX_NAMED],
            "redelivered": self.redelivered,
            "bytes": self.bytes,
            "end_reason": None if end is None else end.reason,
            "latency_ms": latency_stats(self.rows),
        }
        out["media"] = dict(media) if media is not None else None
        return out


def _ms(value: object) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.2f}"


def report_lines(
    summaries: Sequence[Mapping[str, Any]], rows_by_type: Mapping[str, Sequence[Row]]
) -> list[str]:
    """What ``carom-recorder report`` prints: per type, latency over every session's rows; then
    one line per session and type with its verdict (and what is missing or doubled)."""
    lines = ["latency per type (ms, p50 / p99), over every session:"]
    head = f"  {'type':<12} {'rows':>7}" + "".join(f" {h:>24}" for h in HOP_NAMES)
    lines.append(head)
    for type_ in sorted(rows_by_type):
        stats = latency_stats(rows_by_type[type_])
        cells = "".join(
            f" {_ms(stats[h]['p50_ms']) + ' / ' + _ms(stats[h]['p99_ms']):>24}" for h in HOP_NAMES
        )
        lines.append(f"  {type_:<12} {len(rows_by_type[type_]):>7}{cells}")
    lines.append("")
    lines.append("exactly once, per session and type:")
    good = 0
    for s in sorted(summaries, key=lambda s: (str(s.get("session_id")), str(s.get("type")))):
        ok = bool(s.get("exactly_once"))
        good += ok
        media = s.get("media") or {}
        extra = []
        if s.get("missing"):
            extra.append(f"missing {s['missing']}: {_ranges(s.get('missing_seqs', []))}")
        if s.get("unexpected_seqs"):
            extra.append(f"against the end: {_ranges(s['unexpected_seqs'])}")
        if s.get("duplicates_dropped"):
            extra.append(f"duplicates dropped {s['duplicates_dropped']}")
        if media.get("file"):
            extra.append(f"{media['file']}: {media.get('decoded_frames')} frames decoded")
        if media.get("error"):
            extra.append(f"media: {media['error']}")
        lines.append(
            f"  {s.get('session_id')} {s.get('type')}: {s.get('verdict')}, "
            f"received {s.get('received')} of {s.get('expected', '?')}, "
            f"refused {s.get('refused', 0)}, failed {s.get('failed', 0)}"
            + ("; " + "; ".join(extra) if extra else "")
        )
    lines.append(f"{good} of {len(summaries)} exactly once")
    return lines
