"""``carom-report`` / ``python -m carom_tracker.report``: figures and plots from the tracker's CSVs.

Reads ``<session>.csv`` files (default: the newest run folder under ``metrics/``), prints
per-session and overall figures and writes PNG plots. Rows are deduplicated on
``(session_id, rtp_ts)``, keeping the first: delivery is at-least-once, so after a tracker
restart a frame may have two rows.
Orphan rows (a report with no truth) are not frames and are left out.

Every figure says which playout mode (``latency`` column: smooth, interactive, MIN-MAX) its frames
were sent in; a run that mixes modes gets one block per mode before the overall one, so numbers
from different modes are never read as one.

Coverage is ``carom.accounting``'s: per session, every frame index up to the highest seen is due
(sent or not), and each is ok, not detected, missed, not sent, or has no row at all.

A session changed live (stopped, resumed, another fps, size, bitrate, ...) has *phases*: its end,
kept beside its CSV (``records``), says which frames each phase was due and what was in force and
sent. Such a session gets a table of its phases after its block (``phase_figures``): parameters,
coverage against the phase's own frames due, L2, latency per hop, the bitrate sent (measured)
beside its target, and what the browser's stats say of the phase. A session that changed size
has rows of several geometries: each L2 is in its own frame's pixels, so its block says so, and
the phase table gives each size its own line. The time plots mark where phases begin.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carom import accounting
from carom.schemas import ClientStats, PhaseSummary, Status
from carom_tracker import csvrow, records

HOPS: tuple[str, ...] = tuple(name for name, _, _ in csvrow.LATENCIES)


@dataclass
class Loaded:
    rows: list[csvrow.Row]
    raw: int
    duplicates: int
    files: list[Path]
    records: dict[str, records.SessionRecords] = field(default_factory=dict)
    "Each session's records (its end and phases, the browser's stats), by session id."


def newest_run(metrics_dir: Path) -> Path:
    runs = [p for p in metrics_dir.iterdir() if p.is_dir() and any(p.glob("*.csv"))]
    if not runs:
        raise FileNotFoundError(f"no run folder with CSV files under {metrics_dir}")
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in p.glob("*.csv")))


def csv_files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(p.glob("*.csv")) if p.is_dir() else [p])
    return out


def load(files: Iterable[Path]) -> Loaded:
    """Every frame once (first row wins), in file then row order; each CSV's session records."""
    seen: set[tuple[str, int]] = set()
    rows: list[csvrow.Row] = []
    raw = 0
    paths = list(files)
    for path in paths:
        with path.open(newline="", encoding="utf-8") as fh:
            for line, cells in enumerate(csv.DictReader(fh), start=2):
                try:
                    row = csvrow.from_row(cells)
                except ValueError as exc:
                    raise ValueError(f"{path}:{line}: {exc}") from None
                if row.status == "orphan":
                    continue
                raw += 1
                key = (row.session_id, row.rtp_ts)
                if key in seen:
                    continue
                seen.add(key)
                rows.append(row)
    by_session: dict[str, list[Path]] = {}
    for path in paths:
        by_session.setdefault(path.name.removesuffix(".csv"), []).append(records.path_for(path))
    recs = {sid: records.read(found) for sid, found in by_session.items()}
    return Loaded(rows, raw, raw - len(rows), paths, recs)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _fates(rows: Iterable[csvrow.Row], first: int = 0) -> Iterator[tuple[int, Status]]:
    """``(frame - first, status)`` of every frame's row (an orphan has no frame)."""
    for r in rows:
        if r.frame is not None and r.status != "orphan":
            yield r.frame - first, r.status


def coverage(rows: Sequence[csvrow.Row]) -> accounting.Coverage:
    """Coverage over frames due, session by session, added up."""
    total = accounting.Coverage(0)
    for sid in sorted({r.session_id for r in rows}):
        total += accounting.count(_fates(r for r in rows if r.session_id == sid))
    return total


def figures(
    rows: Sequence[csvrow.Row], cov: accounting.Coverage | None = None
) -> dict[str, object]:
    """Coverage (``cov``, else counted from the rows), L2 stats and per-hop latency percentiles
    of a set of frames."""
    l2 = [r.l2 for r in rows if r.l2 is not None]
    cov = coverage(rows) if cov is None else cov
    below = sum(
        1
        for r in rows
        if r.clock_error_ns is not None
        for hop in ("render_to_browser_ms", "analysed_to_router_ms")
        if (v := r.latencies_ms[hop]) is not None and v < -r.clock_error_ns / 1e6 - 0.001
    )
    out: dict[str, object] = {
        "frames": len(rows),
        "coverage": cov,
        "ok": cov.ok,
        "not_detected": cov.not_detected,
        "missed": cov.missed,
        "not_sent": cov.not_sent,
        "clock_cells_beyond_bound": below,
        "l2_mean": float(np.mean(l2)) if l2 else None,
        "l2_p50": _pct(l2, 50),
        "l2_p95": _pct(l2, 95),
        "l2_p99": _pct(l2, 99),
        "l2_max": max(l2) if l2 else None,
    }
    hops: dict[str, dict[str, float | None]] = {}
    for hop in HOPS:
        vals = [v for r in rows if (v := r.latencies_ms[hop]) is not None]
        hops[hop] = {
            "n": float(len(vals)),
            "p50": _pct(vals, 50),
            "p95": _pct(vals, 95),
            "p99": _pct(vals, 99),
        }
    out["latency_ms"] = hops
    return out


def modes(rows: Iterable[csvrow.Row]) -> list[str]:
    """The playout modes of these rows, sorted (``?`` for a row that says none)."""
    return sorted({r.latency or "?" for r in rows})


def _f(value: object, places: int = 2) -> str:
    return (
        "-" if value is None else f"{value:.{places}f}" if isinstance(value, float) else str(value)
    )


def render(title: str, fig: dict[str, object], latency: str = "") -> str:
    """A block of figures; ``latency`` (the playout mode(s)) ends its first line when given."""
    cov = fig["coverage"]
    assert isinstance(cov, accounting.Coverage)
    lines = [
        f"{title}: {cov.line()}; L2 px mean {_f(fig['l2_mean'])} p50 {_f(fig['l2_p50'])} "
        f"p95 {_f(fig['l2_p95'])} max {_f(fig['l2_max'])}" + (f"; {latency}" if latency else "")
    ]
    if fig["clock_cells_beyond_bound"]:
        lines.append(
            f"  WARNING: {fig['clock_cells_beyond_bound']} browser-side hop cell(s) below minus "
            "their clock_error_ms: a clock fault, not a latency"
        )
    hops = fig["latency_ms"]
    assert isinstance(hops, dict)
    for hop, s in hops.items():
        if s["n"]:
            lines.append(
                f"  {hop:<30} n={int(s['n']):<7} p50 {_f(s['p50'], 3):>9}  "
                f"p95 {_f(s['p95'], 3):>9}  p99 {_f(s['p99'], 3):>9} ms"
            )
    return "\n".join(lines)


def geometries(rows: Iterable[csvrow.Row]) -> list[str]:
    """The frame sizes (``WxH``) of these rows, sorted; rows that say none are left out."""
    return sorted({f"{r.width}x{r.height}" for r in rows if r.width and r.height})


@dataclass(frozen=True, slots=True)
class Browser:
    """What the browser's stats (``ClientStats``) say of one phase: the samples within its span.

    The browser's counters are cumulative, so a phase's count is the difference between its first
    and its last sample (none from one sample; none when it went down: the counter started again).
    """

    samples: int
    decoded_fps: float | None = None
    "Frames decoded per second over the phase (else the mean of the samples' own ``fps``)."
    freezes: int | None = None
    freezes_ms: float | None = None
    jitter_buffer_ms: float | None = None
    """Jitter buffer delay per frame emitted over the phase (the change of the two counters);
    else the mean of the samples' whole-session values (clients that send no counters)."""
    received_kbps: float | None = None
    "Bytes received over the phase, as kbit/s."


def _increase(samples: Sequence[ClientStats], name: str) -> tuple[float, float] | None:
    """(increase, seconds) of a cumulative counter from the first sample with it to the last."""
    have = [(s.t_router_recv_ns, v) for s in samples if (v := getattr(s, name)) is not None]
    if len(have) < 2:
        return None
    (t0, v0), (t1, v1) = have[0], have[-1]
    if t1 <= t0 or v1 < v0:
        return None
    return float(v1 - v0), (t1 - t0) / 1e9


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def browser(stats: Sequence[ClientStats], start_ns: int, end_ns: int) -> Browser:
    """The browser's figures of the span ``[start_ns, end_ns)`` (router receive times)."""
    mine = [s for s in stats if start_ns <= s.t_router_recv_ns < end_ns]
    decoded = _increase(mine, "frames_decoded")
    freezes = _increase(mine, "freeze_count")
    frozen = _increase(mine, "freezes_ms")
    received = _increase(mine, "bytes_received")
    held = _increase(mine, "jitter_buffer_delay_s")
    emitted = _increase(mine, "jitter_buffer_emitted")
    fps = [v for s in mine if (v := s.fps) is not None]
    jitter_buffer_ms: float | None
    if held is not None and emitted is not None and emitted[0] > 0:
        jitter_buffer_ms = 1000 * held[0] / emitted[0]
    else:
        jitter_buffer_ms = _mean([v for s in mine if (v := s.jitter_buffer_ms) is not None])
    return Browser(
        samples=len(mine),
        decoded_fps=decoded[0] / decoded[1] if decoded else _mean(fps),
        freezes=None if freezes is None else int(freezes[0]),
        freezes_ms=None if frozen is None else frozen[0],
        jitter_buffer_ms=jitter_buffer_ms,
        received_kbps=None if received is None else 8 * received[0] / received[1] / 1000,
    )


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase of a session and its figures (``phase_figures``)."""

    phase: int
    summary: PhaseSummary | None
    "What the simulator recorded of the phase; None while the session's end is not recorded."
    fig: dict[str, object]
    "``figures`` of its rows, its coverage against its own frames due."
    geometry: list[str]
    "The sizes of its frames (``geometries``): one, unless the record is missing."
    sent_kbps: float | None
    "``8 * bytes_sent / duration``: what the simulator's sender sent, measured."
    browser: Browser


@dataclass
class Phases:
    """A session's phases, and the rows that do not fit them."""

    phases: list[Phase]
    outside: int = 0
    "Rows of a frame that no recorded phase was due (record and rows disagree): left out."
    mislabelled: int = 0
    "Rows whose ``phase`` column is not the phase the record says their frame was due in."


def phase_figures(rows: Sequence[csvrow.Row], recs: records.SessionRecords | None = None) -> Phases:
    """One session's figures phase by phase.

    With the session's end recorded, a row belongs to the phase whose frames due hold its frame
    (the simulator's own bookkeeping, which rows written without the ``phase`` column follow
    too); the column is checked against it. Without one (the session still runs, or an older
    simulator) rows go by their ``phase`` column, a phase's frames due being those from its first
    row's (0 for phase 0) to its last: a lost frame at a phase's start is then not seen.
    """
    summaries = recs.phases if recs is not None else []
    stats = recs.stats if recs is not None else []
    out = Phases([])
    if summaries:
        spans = sorted(
            (s.first_frame, s.first_frame + s.frames_due, i)
            for i, s in enumerate(summaries)
            if s.frames_due
        )
        firsts = [first for first, _, _ in spans]
        groups: list[list[csvrow.Row]] = [[] for _ in summaries]
        for r in rows:
            if r.frame is None:
                continue
            at = bisect.bisect_right(firsts, r.frame) - 1
            if at < 0 or r.frame >= spans[at][1]:
                out.outside += 1
                continue
            i = spans[at][2]
            out.mislabelled += r.phase != summaries[i].phase
            groups[i].append(r)
        for s, mine in zip(summaries, groups, strict=True):
            cov = accounting.count(_fates(mine, s.first_frame), s.frames_due)
            span_s = (s.t_end_ns - s.t_start_ns) / 1e9
            out.phases.append(
                Phase(
                    phase=s.phase,
                    summary=s,
                    fig=figures(mine, cov),
                    geometry=[f"{s.width}x{s.height}"],
                    sent_kbps=8 * s.bytes_sent / span_s / 1000 if span_s > 0 else None,
                    browser=browser(stats, s.t_start_ns, s.t_end_ns),
                )
            )
        return out
    by_phase: dict[int, list[csvrow.Row]] = {}
    for r in rows:
        if r.frame is not None:
            by_phase.setdefault(r.phase or 0, []).append(r)
    for number, mine in sorted(by_phase.items()):
        frames = [r.frame for r in mine if r.frame is not None]
        first = 0 if number == 0 else min(frames)
        cov = accounting.count(_fates(mine, first), max(frames) - first + 1)
        times = [r.t_render_ns for r in mine if r.t_render_ns is not None]
        out.phases.append(
            Phase(
                phase=number,
                summary=None,
                fig=figures(mine, cov),
                geometry=geometries(mine),
                sent_kbps=None,
                browser=browser(stats, min(times), max(times) + 1) if times else Browser(0),
            )
        )
    return out


def has_phases(rows: Sequence[csvrow.Row], recs: records.SessionRecords | None) -> bool:
    """Whether a session gets a phase table: its phases are recorded, or its rows have several."""
    return bool(recs is not None and recs.phases) or len({r.phase or 0 for r in rows}) > 1


def _kbps(bits_per_s: int) -> str:
    return "auto" if bits_per_s == 0 else _f(bits_per_s / 1000, 0)


def _table(header: Sequence[str], lines: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Columns as wide as their widest cell: text left, numbers right."""
    widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=True)]
    left = {i for i, h in enumerate(header) if h in ("state", "size", "background")}

    def one(cells: Sequence[str]) -> str:
        return (
            indent
            + "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )

    return [one(header), *map(one, lines)]


PHASE_COLUMNS: tuple[str, ...] = (
    "phase", "state", "fps", "size", "target kbps", "sent kbps", "keyint", "background", "latency",
    "network", "due", "ok", "not det", "missed", "not sent", "no row", "coverage %", "L2 mean",
    "L2 p99", "dec fps", "freezes", "freeze ms", "jb ms", "recv kbps", "nacks", "resent", "kf asks",
)  # fmt: skip
"""The phase table's columns: the parameters in force (the emulated network's profile too) and
the bitrate sent (simulator), the fate of the phase's frames due and their L2 (tracker), the
browser's stats, then the receiver's RTCP feedback the sender got (NACKs, the packets they asked
again, keyframe requests: PLI/FIR)."""


def render_phases(title: str, ph: Phases) -> str:
    """A session's phase table, then its latency per hop phase by phase (p50/p99, ms)."""
    lines: list[list[str]] = []
    for p in ph.phases:
        s, fig, b = p.summary, p.fig, p.browser
        cov = fig["coverage"]
        assert isinstance(cov, accounting.Coverage)
        params = (
            ["?", "-", "+".join(p.geometry) or "-", "-", "-", "-", "-", "-", "-"]
            if s is None
            else [s.state, f"{s.fps:g}", f"{s.width}x{s.height}", _kbps(s.bitrate),
                  _f(p.sent_kbps, 0), "auto" if s.keyframe_interval == 0 else
                  str(s.keyframe_interval), s.background, s.latency, s.network]
        )  # fmt: skip
        rtcp = ["-"] * 3
        if s is not None:
            rtcp = [str(s.nacks), str(s.retransmitted), str(s.keyframe_requests)]
        lines.append(
            [
                str(p.phase), *params,
                str(cov.due), str(cov.ok), str(cov.not_detected), str(cov.missed),
                str(cov.not_sent), str(cov.no_row),
                _f(100 * cov.fraction) if cov.due else "-",
                _f(fig["l2_mean"]), _f(fig["l2_p99"]),
                _f(b.decoded_fps, 1), _f(b.freezes), _f(b.freezes_ms, 0),
                _f(b.jitter_buffer_ms, 1), _f(b.received_kbps, 0), *rtcp,
            ]
        )  # fmt: skip
    out = [f"{title}: {len(ph.phases)} phase(s)", *_table(PHASE_COLUMNS, lines)]
    if ph.outside or ph.mislabelled:
        out.append(
            f"  WARNING: {ph.outside} row(s) of frames no phase was due (left out), "
            f"{ph.mislabelled} whose phase column differs from the recorded phases"
        )
    hop_stats = [p.fig["latency_ms"] for p in ph.phases]
    hops = [h for h in HOPS if any(isinstance(d, dict) and d[h]["n"] for d in hop_stats)]
    if hops:
        lat = [
            [str(p.phase)] + [f"{_f(d[h]['p50'], 1)}/{_f(d[h]['p99'], 1)}" for h in hops]
            for p, d in zip(ph.phases, hop_stats, strict=True)
            if isinstance(d, dict)
        ]
        out.append("  latency per hop by phase, ms p50/p99:")
        out.extend(_table(["phase", *(h.removesuffix("_ms") for h in hops)], lat, "    "))
    return "\n".join(out)


def plot(rows: Sequence[csvrow.Row], out: Path, boundaries_ns: Iterable[int] = ()) -> list[Path]:
    """Latency over time, latency distribution per hop, L2 over time; the PNG paths.

    ``boundaries_ns``: where phases begin (``PhaseSummary.t_start_ns``), a dashed line on both
    time plots, so a change of latency or L2 is seen next to the change of parameters behind it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    t0 = min((r.t_render_ns for r in rows if r.t_render_ns is not None), default=0)
    hops = [h for h in HOPS if any(r.latencies_ms[h] is not None for r in rows)]
    paths: list[Path] = []
    marks = sorted({(b - t0) / 1e9 for b in boundaries_ns if b > t0})

    def mark(ax: object) -> None:
        for x in marks:
            ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)  # type: ignore[attr-defined]

    fig, ax = plt.subplots(figsize=(10, 5))
    mark(ax)
    for hop in hops:
        pts = [
            ((r.t_render_ns - t0) / 1e9, v)
            for r in rows
            if r.t_render_ns is not None and (v := r.latencies_ms[hop]) is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, ".", markersize=2, label=hop)
    ax.set(xlabel="time since first render (s)", ylabel="latency (ms)", title="Latency over time")
    if hops:
        ax.legend(fontsize="small", markerscale=4)
    paths.append(_save(fig, out / "latency_over_time.png"))

    fig, ax = plt.subplots(figsize=(10, 5))
    data = [[v for r in rows if (v := r.latencies_ms[h]) is not None] for h in hops]
    if hops:
        ax.boxplot(data, whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(hops) + 1), [h.removesuffix("_ms") for h in hops], rotation=30)
    ax.set(ylabel="latency (ms)", title="Latency per hop (whiskers p1-p99)")
    fig.tight_layout()
    paths.append(_save(fig, out / "latency_per_hop.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    mark(ax)
    for sid in sorted({r.session_id for r in rows}):
        pts = [
            ((r.t_render_ns - t0) / 1e9, r.l2)
            for r in rows
            if r.session_id == sid and r.t_render_ns is not None and r.l2 is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, ".", markersize=2, label=sid)
    ax.set(xlabel="time since first render (s)", ylabel="L2 error (px)", title="L2 over time")
    paths.append(_save(fig, out / "l2_over_time.png"))
    return paths


def _save(fig: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="carom-report",
        description="Figures and plots from the tracker's CSV files (deduped on session+rtp_ts).",
    )
    parser.add_argument("paths", nargs="*", type=Path, help="run folder(s) or CSV files")
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"),
                        help="where to find the newest run when no path is given")  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: the run folder)")
    args = parser.parse_args(argv)
    try:
        paths = list(args.paths) or [newest_run(args.metrics_dir)]
        files = csv_files(paths)
        if not files:
            raise FileNotFoundError(f"no CSV files in {', '.join(map(str, paths))}")
        loaded = load(files)
    except (OSError, ValueError) as exc:
        print(f"carom-report: {exc}", file=sys.stderr)
        return 2
    rows = loaded.rows
    print(
        f"{len(files)} file(s), {loaded.raw} rows, {loaded.duplicates} duplicate(s) of "
        "(session_id, rtp_ts) dropped (at-least-once delivery: first row kept)"
    )
    recs = loaded.records
    redone = sum(r.duplicates for r in recs.values())
    torn = sum(r.torn for r in recs.values())
    if redone or torn:
        print(f"session records: {redone} duplicate(s) dropped, {torn} torn last line(s) left out")
    for sid in sorted({r.session_id for r in rows}):
        mine = [r for r in rows if r.session_id == sid]
        sizes = geometries(mine)
        tail = f"latency {'+'.join(modes(mine))}"
        if len(sizes) > 1:
            tail += f"; frames {'+'.join(sizes)} (each L2 in its own frame's pixels)"
        print(render(f"session {sid}", figures(mine), tail))
        if has_phases(mine, recs.get(sid)):
            print(render_phases(f"phases of {sid}", phase_figures(mine, recs.get(sid))))
    all_modes = modes(rows)
    if len(all_modes) > 1:
        for mode in all_modes:
            subset = [r for r in rows if (r.latency or "?") == mode]
            print(render(f"latency {mode}", figures(subset)))
    mixed = " (MIXED: one block per mode above)" if len(all_modes) > 1 else ""
    print(render("overall", figures(rows), f"latency {'+'.join(all_modes)}{mixed}"))
    out = args.out or (paths[0] if paths[0].is_dir() else paths[0].parent)
    starts = [p.t_start_ns for r in recs.values() for p in r.phases[1:]]
    for p in plot(rows, out, starts):
        print(f"wrote {p}")
    return 0


def main_entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
