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
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carom import accounting
from carom_tracker import csvrow

HOPS: tuple[str, ...] = tuple(name for name, _, _ in csvrow.LATENCIES)


@dataclass
class Loaded:
    rows: list[csvrow.Row]
    raw: int
    duplicates: int
    files: list[Path]


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
    """Every frame once (first row wins), in file then row order."""
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
    return Loaded(rows, raw, raw - len(rows), paths)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def coverage(rows: Sequence[csvrow.Row]) -> accounting.Coverage:
    """Coverage over frames due, session by session, added up."""
    total = accounting.Coverage(0)
    for sid in sorted({r.session_id for r in rows}):
        total += accounting.count(
            (r.frame, r.status)
            for r in rows
            if r.session_id == sid and r.frame is not None and r.status != "orphan"
        )
    return total


def figures(rows: Sequence[csvrow.Row]) -> dict[str, object]:
    """Coverage, L2 stats and per-hop latency percentiles of a set of frames."""
    l2 = [r.l2 for r in rows if r.l2 is not None]
    cov = coverage(rows)
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


def plot(rows: Sequence[csvrow.Row], out: Path) -> list[Path]:
    """Latency over time, latency distribution per hop, L2 over time; the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    t0 = min((r.t_render_ns for r in rows if r.t_render_ns is not None), default=0)
    hops = [h for h in HOPS if any(r.latencies_ms[h] is not None for r in rows)]
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(10, 5))
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
    for sid in sorted({r.session_id for r in rows}):
        mine = [r for r in rows if r.session_id == sid]
        print(render(f"session {sid}", figures(mine), f"latency {'+'.join(modes(mine))}"))
    all_modes = modes(rows)
    if len(all_modes) > 1:
        for mode in all_modes:
            subset = [r for r in rows if (r.latency or "?") == mode]
            print(render(f"latency {mode}", figures(subset)))
    mixed = " (MIXED: one block per mode above)" if len(all_modes) > 1 else ""
    print(render("overall", figures(rows), f"latency {'+'.join(all_modes)}{mixed}"))
    out = args.out or (paths[0] if paths[0].is_dir() else paths[0].parent)
    for p in plot(rows, out):
        print(f"wrote {p}")
    return 0


def main_entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
