"""One CSV row per frame: the tracker writes them, the report command reads them back.

A value that does not exist is an empty cell, never 0: a missed frame has no position, no error
and no browser times, and a 0 there would pass for a perfect measurement. Per-hop latencies are
derived from the ns timestamps (end minus start) and are empty when either end is; they keep their
sign, because a negative hop is how a bad clock-offset estimate shows up.

Numbers have fixed formats so files diff cleanly: positions 3 decimals, L2 4 decimals, latencies
3 decimals (ms), timestamps as integer ns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from carom.schemas import playout_delay
from carom_tracker.join import ResultStatus

_STATUSES: Final[dict[str, ResultStatus]] = {
    "ok": "ok",
    "not_detected": "not_detected",
    "missed": "missed",
    "not_sent": "not_sent",
    "orphan": "orphan",
}
_JOINED: Final = frozenset({"ok", "not_detected"})

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

#: The CSV header, in order.
COLUMNS: Final[tuple[str, ...]] = (
    "session_id",
    "frame",
    "rtp_ts",
    "status",
    "truth_x",
    "truth_y",
    "x",
    "y",
    "l2_px",
    *STAMPS,
    *(name for name, _, _ in LATENCIES),
    "reason",
    "clock_error_ms",
    "latency",
)

#: Columns added after the first files were written: a file without them still reads back.
_ADDED: Final = frozenset({"reason", "clock_error_ms", "latency"})

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
}


class RowSource(Protocol):
    """What ``to_row`` needs: a ``join.Result`` or a ``Row`` read back from a file."""

    @property
    def session_id(self) -> str: ...
    @property
    def frame(self) -> int | None: ...
    @property
    def rtp_ts(self) -> int: ...
    @property
    def status(self) -> ResultStatus: ...
    @property
    def truth_x(self) -> float | None: ...
    @property
    def truth_y(self) -> float | None: ...
    @property
    def x(self) -> float | None: ...
    @property
    def y(self) -> float | None: ...
    @property
    def l2(self) -> float | None: ...
    @property
    def t_render_ns(self) -> int | None: ...
    @property
    def t_browser_recv_ns(self) -> int | None: ...
    @property
    def t_browser_analysed_ns(self) -> int | None: ...
    @property
    def t_router_recv_ns(self) -> int | None: ...
    @property
    def t_published_ns(self) -> int | None: ...
    @property
    def t_tracker_consumed_ns(self) -> int | None: ...
    @property
    def t_computed_ns(self) -> int | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def clock_error_ns(self) -> int | None: ...
    @property
    def latency(self) -> str | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One parsed CSV row; field names as in ``join.Result`` (``l2`` is the ``l2_px`` column)."""

    session_id: str
    frame: int | None
    rtp_ts: int
    status: ResultStatus
    truth_x: float | None
    truth_y: float | None
    x: float | None
    y: float | None
    l2: float | None
    t_render_ns: int | None
    t_browser_recv_ns: int | None
    t_browser_analysed_ns: int | None
    t_router_recv_ns: int | None
    t_published_ns: int | None
    t_tracker_consumed_ns: int | None
    t_computed_ns: int | None
    latencies_ms: dict[str, float | None]
    "Derived latency columns by name, as written (rounded to the microsecond)."
    reason: str | None = None
    clock_error_ns: int | None = None
    latency: str | None = None
    "Playout mode (None for an orphan)."


_SPANS: Final = tuple(
    (STAMPS.index(start), STAMPS.index(end), name == "render_to_computed_ms")
    for name, start, end in LATENCIES
)


def _stamp_values(src: RowSource) -> tuple[int | None, ...]:
    return (
        src.t_render_ns,
        src.t_browser_recv_ns,
        src.t_browser_analysed_ns,
        src.t_router_recv_ns,
        src.t_published_ns,
        src.t_tracker_consumed_ns,
        src.t_computed_ns,
    )


def stamps(src: RowSource) -> dict[str, int | None]:
    """The hop timestamps by column name."""
    return dict(zip(STAMPS, _stamp_values(src), strict=True))


def _latencies(src: RowSource, t: tuple[int | None, ...]) -> list[float | None]:
    joined = src.status in _JOINED
    out: list[float | None] = []
    for a, b, joined_only in _SPANS:
        start, end = t[a], t[b]
        out.append(
            None if start is None or end is None or (joined_only and not joined)
            else (end - start) / 1e6
        )  # fmt: skip
    return out


def latencies_ms(src: RowSource) -> dict[str, float | None]:
    """Each derived hop latency in ms (unrounded); None where it does not exist."""
    values = _latencies(src, _stamp_values(src))
    return {name: v for (name, _, _), v in zip(LATENCIES, values, strict=True)}


def to_row(src: RowSource) -> list[str]:
    """The cells of one row, in ``COLUMNS`` order."""
    t = _stamp_values(src)
    cells = [
        src.session_id,
        _int(src.frame),
        str(src.rtp_ts),
        src.status,
        _fixed(src.truth_x, 3),
        _fixed(src.truth_y, 3),
        _fixed(src.x, 3),
        _fixed(src.y, 3),
        _fixed(src.l2, 4),
    ]
    cells.extend([_int(v) for v in t])
    cells.extend([_fixed(v, 3) for v in _latencies(src, t)])
    cells.append(src.reason or "")
    err = src.clock_error_ns
    cells.append("" if err is None else _fixed(err / 1e6, 3))
    cells.append(src.latency or "")
    return cells


def to_line(src: RowSource) -> str:
    """The row as one CSV line; no cell ever needs quoting (session ids are ``[A-Za-z0-9_.-]``).

    The sink's hot path: ``csv.writer`` costs a third more for the same bytes.
    """
    return ",".join(to_row(src)) + "\n"


def from_row(cells: Mapping[str, str]) -> Row:
    """Parse a row as read by ``csv.DictReader``; extra columns are ignored (newer writers)."""
    missing = [c for c in COLUMNS if c not in cells and c not in _ADDED]
    if missing:
        raise ValueError(f"CSV row lacks column(s): {', '.join(missing)}")
    status = _STATUSES.get(cells["status"])
    if status is None:
        raise ValueError(f"column `status`: unknown value {cells['status']!r}")
    rtp_ts = _opt_int(cells, "rtp_ts")
    if rtp_ts is None:
        raise ValueError("column `rtp_ts`: empty")
    return Row(
        session_id=cells["session_id"],
        frame=_opt_int(cells, "frame"),
        rtp_ts=rtp_ts,
        status=status,
        truth_x=_opt_float(cells, "truth_x"),
        truth_y=_opt_float(cells, "truth_y"),
        x=_opt_float(cells, "x"),
        y=_opt_float(cells, "y"),
        l2=_opt_float(cells, "l2_px"),
        t_render_ns=_opt_int(cells, "t_render_ns"),
        t_browser_recv_ns=_opt_int(cells, "t_browser_recv_ns"),
        t_browser_analysed_ns=_opt_int(cells, "t_browser_analysed_ns"),
        t_router_recv_ns=_opt_int(cells, "t_router_recv_ns"),
        t_published_ns=_opt_int(cells, "t_published_ns"),
        t_tracker_consumed_ns=_opt_int(cells, "t_tracker_consumed_ns"),
        t_computed_ns=_opt_int(cells, "t_computed_ns"),
        latencies_ms={name: _opt_float(cells, name) for name, _, _ in LATENCIES},
        reason=cells.get("reason", "").strip() or None,
        clock_error_ns=_opt_ns_from_ms(cells, "clock_error_ms"),
        latency=_latency(cells, status),
    )


def _latency(cells: Mapping[str, str], status: ResultStatus) -> str | None:
    if "latency" not in cells:  # written before the column: nothing wrote the extension then
        return None if status == "orphan" else "smooth"
    text = cells["latency"].strip()
    if not text:
        return None
    try:
        playout_delay(text)
    except ValueError:
        raise ValueError(f"column `latency`: not a playout mode: {text!r}") from None
    return text


def _opt_ns_from_ms(cells: Mapping[str, str], name: str) -> int | None:
    value = _opt_float(cells, name) if name in cells else None
    return None if value is None else round(value * 1e6)


def _int(value: int | None) -> str:
    return "" if value is None else str(value)


def _fixed(value: float | None, places: int) -> str:
    if value is None:
        return ""
    text = f"{value:.{places}f}"
    # A tiny negative rounds to "-0.000"; print it as 0 so it does not look like a measured sign.
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def _opt_int(cells: Mapping[str, str], name: str) -> int | None:
    text = cells[name].strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"column `{name}`: not an integer: {text!r}") from None


def _opt_float(cells: Mapping[str, str], name: str) -> float | None:
    text = cells[name].strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"column `{name}`: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"column `{name}`: not a finite number: {text!r}")
    return value
