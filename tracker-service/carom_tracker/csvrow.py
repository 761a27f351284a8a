"""One CSV row per frame: the tracker writes them, the report command reads them back.

A value that does not exist is an empty cell, never 0: a missed frame has no position, no error
and no browser times, and a 0 there would pass for a perfect measurement. Per-hop latencies are
derived from the ns timestamps (end minus start) and are empty when either end is; they keep their
sign, because a negative hop is how a bad clock-offset estimate shows up.

Numbers have fixed formats so files diff cleanly: positions 3 decimals, L2 4 decimals, latencies
3 decimals (ms), timestamps as integer ns.

The columns are ``join.FrameRow``'s fields, in its order, each written and read back by its entry
in ``_CELLS`` (a field without one, or a cell without its field, stops the import), with the
derived latencies after the last timestamp. A row read back is a ``FrameRow`` again (``Row``).

Columns are only ever appended, so every file's header is a prefix of today's or today's of its
own: a file without the newer columns reads back (``_Cell.before``), and a file begun by another
version of the tracker is continued in its own layout (``width_of``), never with a second header.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, TypeVar

from carom.schemas import playout_delay
from carom_tracker.join import ROW_FIELDS, FrameRow, ResultStatus

_STATUSES: Final[dict[str, ResultStatus]] = {
    "ok": "ok",
    "not_detected": "not_detected",
    "missed": "missed",
    "not_sent": "not_sent",
    "orphan": "orphan",
}
_JOINED: Final = frozenset({"ok", "not_detected"})
_T = TypeVar("_T")

#: Hop timestamps, in pipeline order (epoch ns, server clock).
STAMPS: Final = (
    "t_render_ns",
    "t_browser_recv_ns",
    "t_browser_analysed_ns",
    "t_router_recv_ns",
    "t_published_ns",
    "t_tracker_consumed_ns",
    "t_computed_ns",
)

#: Derived latencies: (column, start stamp, end stamp).
LATENCIES: Final = (
    ("render_to_browser_ms", "t_render_ns", "t_browser_recv_ns"),
    ("browser_decode_to_analysed_ms", "t_browser_recv_ns", "t_browser_analysed_ns"),
    ("analysed_to_router_ms", "t_browser_analysed_ns", "t_router_recv_ns"),
    ("router_to_published_ms", "t_router_recv_ns", "t_published_ns"),
    ("published_to_tracker_ms", "t_published_ns", "t_tracker_consumed_ns"),
    ("tracker_to_computed_ms", "t_tracker_consumed_ns", "t_computed_ns"),
    ("end_to_end_ms", "t_render_ns", "t_router_recv_ns"),
    ("render_to_computed_ms", "t_render_ns", "t_computed_ns"),
)


#: Each ``_fixed`` writer's decimals (``_compile_line`` writes those cells inline).
_PLACES: Final[dict[Callable[[Any], str], int]] = {}


def _fixed(places: int) -> Callable[[float | None], str]:
    """A writer of ``places`` decimals; empty for None."""
    spec = f".{places}f"

    def write(value: float | None) -> str:
        if value is None:
            return ""
        text = format(value, spec)
        # A tiny negative rounds to "-0.000"; print it as 0: it is no measured sign.
        return text[1:] if text.startswith("-") and float(text) == 0.0 else text

    _PLACES[write] = places
    return write


_px: Final = _fixed(3)
_ms: Final = _fixed(3)


def _int(value: int | None) -> str:
    return "" if value is None else str(value)


def _text(value: str | None) -> str:
    return value or ""


def _ns_as_ms(value: int | None) -> str:
    return "" if value is None else _ms(value / 1e6)


def _as_is(column: str, text: str) -> str:
    return text


def _opt_text(column: str, text: str) -> str | None:
    return text.strip() or None


def _parsed(column: str, text: str, parse: Callable[[str], _T], what: str) -> _T | None:
    """The cell's value (None when empty); a ValueError names the column and what it is not."""
    text = text.strip()
    if not text:
        return None
    try:
        return parse(text)
    except ValueError:
        raise ValueError(f"column `{column}`: not {what}: {text!r}") from None


def _opt_int(column: str, text: str) -> int | None:
    return _parsed(column, text, int, "an integer")


def _int_required(column: str, text: str) -> int:
    value = _opt_int(column, text)
    if value is None:
        raise ValueError(f"column `{column}`: empty")
    return value


def _opt_float(column: str, text: str) -> float | None:
    value = _parsed(column, text, float, "a number")
    if value is not None and not math.isfinite(value):
        raise ValueError(f"column `{column}`: not a finite number: {text!r}")
    return value


def _ms_as_ns(column: str, text: str) -> int | None:
    value = _opt_float(column, text)
    return None if value is None else round(value * 1e6)


def _status(column: str, text: str) -> ResultStatus:
    status = _STATUSES.get(text)
    if status is None:
        raise ValueError(f"column `{column}`: unknown value {text!r}")
    return status


def _mode(text: str) -> str:
    playout_delay(text)  # a ValueError for anything that is not a mode
    return text


def _latency(column: str, text: str) -> str | None:
    return _parsed(column, text, _mode, "a playout mode")


@dataclass(frozen=True, slots=True)
class _Cell:
    """How one ``FrameRow`` field is written to its column and read back."""

    write: Callable[[Any], str]
    "The value (None: does not exist) -> the cell's text (empty for None)."
    read: Callable[[str, str], Any]
    "(column, text) -> the value; a ValueError names the column."
    column: str = ""
    "The column's name, when it is not the field's."
    added: bool = False
    "Added after the first files were written: a file without the column still reads back."
    before: object = None
    """What a frame's cell means in a file written before the column existed (an orphan's is
    None: it has no frame): what every frame was then."""


_CELLS: Final[dict[str, _Cell]] = {
    "session_id": _Cell(str, _as_is),
    "frame": _Cell(_int, _opt_int),
    "rtp_ts": _Cell(str, _int_required),
    "status": _Cell(str, _status),
    "truth_x": _Cell(_px, _opt_float),
    "truth_y": _Cell(_px, _opt_float),
    "x": _Cell(_px, _opt_float),
    "y": _Cell(_px, _opt_float),
    "l2": _Cell(_fixed(4), _opt_float, "l2_px"),
    **{name: _Cell(_int, _opt_int) for name in STAMPS},
    "reason": _Cell(_text, _opt_text, added=True),
    "clock_error_ns": _Cell(_ns_as_ms, _ms_as_ns, "clock_error_ms", added=True),
    "latency": _Cell(_text, _latency, added=True, before="smooth"),
    "phase": _Cell(_int, _opt_int, added=True, before=0),
    "width": _Cell(_int, _opt_int, added=True),
    "height": _Cell(_int, _opt_int, added=True),
}
"""Every ``FrameRow`` field's cell, by field name."""
if set(_CELLS) != set(ROW_FIELDS):
    raise TypeError(f"FrameRow fields and CSV cells differ: {set(_CELLS) ^ set(ROW_FIELDS)}")
_COLUMN_OF: Final = {name: _CELLS[name].column or name for name in ROW_FIELDS}


def _columns() -> tuple[str, ...]:
    out: list[str] = []
    for name in ROW_FIELDS:
        out.append(_COLUMN_OF[name])
        if name == STAMPS[-1]:
            out.extend(column for column, _, _ in LATENCIES)
    return tuple(out)


#: The CSV header, in order: ``FrameRow``'s fields, the derived latencies after the last stamp.
COLUMNS: Final = _columns()

#: Columns added after the first files were written: a file without them still reads back.
_ADDED: Final = frozenset(_COLUMN_OF[name] for name, c in _CELLS.items() if c.added)
#: Fields whose frames had one value before their column existed: (field, that value).
_BEFORE: Final = tuple((name, c.before) for name, c in _CELLS.items() if c.before is not None)

#: One line per column, for the README table and ``--help`` output.
COLUMN_DOCS: Final[dict[str, str]] = {
    "session_id": "Session the frame belongs to.",
    "frame": "Simulator frame counter (from 0); empty for an orphan report.",
    "rtp_ts": "RTP timestamp (90 kHz, wraps at 2**32): the frame's identity within its session.",
    "status": "ok, not_detected (browser found no ball), missed (sent, no report in the window), "
    "not_sent (due, never sent) or orphan (a report whose truth never came). "
    "Every frame due has exactly one row (docs/accounting.md).",
    "truth_x": "True ball centre x, px; empty for an orphan or a frame not sent.",
    "truth_y": "True ball centre y, px; empty for an orphan or a frame not sent.",
    "x": "Reported ball centre x, px; empty when nothing was detected or there is no report.",
    "y": "Reported ball centre y, px; empty when nothing was detected or there is no report.",
    "l2_px": "Euclidean distance reported-truth, px; only for ok (a non-detection is not 0 error).",
    "t_render_ns": "Simulator rendered the frame (epoch ns, server clock); for not_sent, when it "
    "was due.",
    "t_browser_recv_ns": "Browser received the frame (converted to the server clock).",
    "t_browser_analysed_ns": "Browser computed the centroid (converted to the server clock).",
    "t_router_recv_ns": "Router received the report over WebTransport.",
    "t_published_ns": "Router published the report to Pulsar.",
    "t_tracker_consumed_ns": "Tracker consumed the later of truth and report; only when both came.",
    "t_computed_ns": "Tracker decided the row (joined, or gave up waiting).",
    "render_to_browser_ms": "Render to browser receipt: the video path (encode, network, buffer).",
    "browser_decode_to_analysed_ms": "Browser receipt to analysis done: the detector's time.",
    "analysed_to_router_ms": "Analysis done to router receipt: the WebTransport uplink.",
    "router_to_published_ms": "Router receipt to publish: the router's own time.",
    "published_to_tracker_ms": "Publish to tracker consumption, including any wait for the truth.",
    "tracker_to_computed_ms": "Consumption to join inside the tracker.",
    "end_to_end_ms": "Render to router receipt: the glass-to-report latency of the system.",
    "render_to_computed_ms": "Render to join; only for joined rows (for missed it is the window).",
    "reason": "Why a frame has no L2: late (not_sent: the simulator skipped it, behind its "
    "schedule), no_report or memory_cap (missed), truth_late (missed: its report was given up "
    "before the truth came); empty otherwise.",
    "clock_error_ms": "Bound on the browser clock offset's error, ms: the two hops that cross "
    "clocks (render_to_browser_ms, analysed_to_router_ms) are right to within it; a negative "
    "one inside it is clock noise. Empty when no report came.",
    "latency": "Playout mode the frame was sent in: smooth (the browser's buffering), "
    "interactive (rendered on decode) or MIN-MAX ms; empty for an orphan. Files written before "
    "the column existed read back as smooth (nothing wrote the extension then).",
    "phase": "The session's phase the frame was due in (live control: each change of parameters, "
    "stop or resume starts the next; the phases are in <session>.session.jsonl); empty for an "
    "orphan. Files written before the column existed read back as 0 (there was one phase).",
    "width": "The frame's width, px: the geometry its positions and L2 are in (a session can "
    "change resolution mid-stream); empty for not_sent, an orphan, or an older simulator.",
    "height": "The frame's height, px; empty when width is.",
}


class Row(FrameRow, frozen=True, kw_only=True):
    """One parsed CSV row: the frame's ``FrameRow``, and its derived latencies as written."""

    latencies_ms: dict[str, float | None]
    "Derived latency columns by name, as written (rounded to the microsecond)."


_SPANS: Final = tuple(
    (STAMPS.index(start), STAMPS.index(end), name == "render_to_computed_ms")
    for name, start, end in LATENCIES
)
_stamp_values: Final = attrgetter(*STAMPS)
_values: Final = attrgetter(*ROW_FIELDS)
_WRITERS: Final = tuple(_CELLS[name].write for name in ROW_FIELDS)
_LATENCIES_AT: Final = ROW_FIELDS.index(STAMPS[-1]) + 1


def stamps(src: FrameRow) -> dict[str, int | None]:
    """The hop timestamps by column name."""
    return dict(zip(STAMPS, _stamp_values(src), strict=True))


def _latencies(status: ResultStatus, t: tuple[int | None, ...]) -> list[float | None]:
    joined = status in _JOINED
    out: list[float | None] = []
    for a, b, joined_only in _SPANS:
        start, end = t[a], t[b]
        out.append(
            None if start is None or end is None or (joined_only and not joined)
            else (end - start) / 1e6
        )  # fmt: skip
    return out


def latencies_ms(src: FrameRow) -> dict[str, float | None]:
    """Each derived hop latency in ms (unrounded); None where it does not exist."""
    values = _latencies(src.status, _stamp_values(src))
    return {name: v for (name, _, _), v in zip(LATENCIES, values, strict=True)}


def to_row(src: FrameRow) -> list[str]:
    """The cells of one row, in ``COLUMNS`` order."""
    cells = list(map(operator.call, _WRITERS, _values(src)))  # the sink's hot path: a loop in C
    cells[_LATENCIES_AT:_LATENCIES_AT] = map(_ms, _latencies(src.status, _stamp_values(src)))
    return cells


def to_line(src: FrameRow, width: int | None = None) -> str:
    """The row as one CSV line; no cell ever needs quoting (session ids are ``[A-Za-z0-9_.-]``).

    ``width``: a file's own number of columns (``width_of``), when it is not today's. Today's
    layout, the sink's hot path, is one generated f-string (``_compile_line``); ``to_row`` is the
    reference it must equal (a test holds them together).
    """
    if width is None:
        return _line(src)
    cells = to_row(src)
    cells = cells[:width] + [""] * (width - len(cells))
    return ",".join(cells) + "\n"


#: Writers whose cell is written inline in ``_line``: a template of the value's name ``{v}``.
_INLINE: Final[dict[Callable[[Any], str], str]] = {
    str: "{{{v}}}",
    _int: "{{'' if {v} is None else {v}}}",
    _text: "{{{v} or ''}}",
}


def _compile_line() -> Callable[[FrameRow], str]:
    """``to_row`` joined into one line, as one f-string over the row's values.

    Written out from ``_CELLS`` and ``LATENCIES`` when the module loads, as ``dataclasses``
    writes its ``__init__``: a call per cell (``to_row``) was most of the join thread's CSV time
    while draining a backlog. Cells of fixed decimals are ``%``-formatted inline and call their
    writer only for a negative value (which may print as -0).
    """
    parts: list[str] = []
    env: dict[str, object] = {"_values": _values, "_JOINED": _JOINED}
    for i, name in enumerate(ROW_FIELDS):
        write = _CELLS[name].write
        env[f"_w{i}"] = write
        if write in _PLACES:
            parts.append(_fixed_inline(f"_w{i}", _PLACES[write], name))
        else:
            template = _INLINE.get(write, "{{_w%d({v})}}" % i)  # noqa: UP031 - braces in it
            parts.append(template.format(v=name))
        if name == STAMPS[-1]:
            env["_ms"] = _ms
            for column, start, end in LATENCIES:
                joined = " or status not in _JOINED" if column == "render_to_computed_ms" else ""
                value = f"(({end} - {start}) / 1e6)"
                empty = f"{start} is None or {end} is None{joined}"
                parts.append(_fixed_inline("_ms", _PLACES[_ms], value, empty))
    source = (
        "def _line(src):\n"
        f"    {', '.join(ROW_FIELDS)}, = _values(src)\n"
        f'    return f"{",".join(parts)}\\n"\n'
    )
    exec(source, env)
    return env["_line"]  # type: ignore[return-value]


def _fixed_inline(writer: str, places: int, value: str, empty: str | None = None) -> str:
    """An f-string field writing ``value`` as the ``_fixed(places)`` named ``writer`` does."""
    empty = empty or f"{value} is None"
    fast = f"(_t if (_t := '%.{places}f' % {value})[0] != '-' else {writer}({value}))"
    return f"{{'' if {empty} else {fast}}}"


_line: Final = _compile_line()


def width_of(header: str) -> int | None:
    """How many cells a row must have to continue a file with this header line.

    None: today's header (or one that is not a Carom header: written as today's). An older
    tracker's header is a prefix of today's: its rows are cut to it, so that the file stays a
    CSV of its own header (the cells cut off are the frame's phase and geometry, which its
    session's phases record still has). A newer tracker's has today's as a prefix: rows are
    padded with empty cells.
    """
    names = tuple(header.rstrip("\r\n").split(","))
    if names == COLUMNS or len(names) < 2:
        return None
    if names == COLUMNS[: len(names)] or names[: len(COLUMNS)] == COLUMNS:
        return len(names)
    return None


def from_row(cells: Mapping[str, str]) -> Row:
    """Parse a row as read by ``csv.DictReader``; extra columns are ignored (newer writers)."""
    missing = [c for c in COLUMNS if c not in cells and c not in _ADDED]
    if missing:
        raise ValueError(f"CSV row lacks column(s): {', '.join(missing)}")
    values: dict[str, Any] = {}
    for name in ROW_FIELDS:
        column = _COLUMN_OF[name]
        text = cells.get(column)  # None only for a column in _ADDED
        values[name] = None if text is None else _CELLS[name].read(column, text)
    if values["status"] != "orphan":
        for name, before in _BEFORE:
            if _COLUMN_OF[name] not in cells:
                values[name] = before
    lat = {name: _opt_float(name, cells[name]) for name, _, _ in LATENCIES}
    return Row(**values, latencies_ms=lat)
