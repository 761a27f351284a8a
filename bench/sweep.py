"""Network sweep (issue 20, item 3): tracking error, frames kept, freezes and per-hop latency
against each axis of an emulated network (delay, jitter, loss, bandwidth), measured end to end.

Usage::

    flock /tmp/carom-heavy.lock .venv/bin/python -m bench.sweep \\
        [--clients python|chromium] [--path media|reports|results|all] [--fps 30] \\
        [--axes delay,jitter,loss,rate] [--seconds 10] [--results-dir bench/results]

Every point is one session on a fresh stack (simulator, router, tracker, as ``bench/e2e.py``
runs them: ``e2e.run_point``), its network set at hello (``SessionParams.network``, a profile's
fields), on the local broker (started if needed). One axis moves at a time from a clear network,
on ``--path`` (default the media path: the video's RTP and its RTCP, both ways):

- ``delay``: one-way delay 0, 25, 50, 100, 200 ms;
- ``jitter``: 50 ms of delay with a normal jitter of 0, 5, 10, 20, 40 ms (standard deviation;
  the emulation keeps packets in order, so jitter shows as delay spread, not reordering);
- ``loss``: random loss of 0, 1, 2, 5, 10 % of packets;
- ``rate``: a bandwidth cap of none, 4,000, 2,000, 1,000, 500 kbit/s, 200 ms of queue.

What is written for each point, from the tracker's CSV (every frame due, ``carom.accounting``):
frames due, the share with an L2 row (*kept*), missed and skipped, mean L2, *freezes* (a gap of
more than three frame intervals between two frames the client received: count and time frozen),
and the p50/p99 of every hop. With Chromium clients the page's getStats figures are read from
the session's records too (its own freeze count, jitter buffer, bitrate received). Results:
``<results-dir>/sweep-<clients>-<path>.json``, ``.md`` and ``.png`` (one panel per measure, one
line per axis, each against its own axis's values).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import e2e
from carom.impairment import Path as NetPath
from carom.impairment import Profile
from carom_local import pulsar as local_pulsar
from carom_local.run import delete_topics, private_topics
from carom_runtime.ice import set_host_addresses
from carom_tracker import csvrow, report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: Each axis: its unit, its values, and the path a value gives (on a clear network).
AXES: dict[str, tuple[str, tuple[float, ...]]] = {
    "delay": ("one-way delay (ms)", (0, 25, 50, 100, 200)),
    "jitter": ("jitter, normal sd (ms), on 50 ms of delay", (0, 5, 10, 20, 40)),
    "loss": ("random loss (%)", (0, 1, 2, 5, 10)),
    "rate": ("bandwidth cap (kbit/s; 0: none)", (0, 4000, 2000, 1000, 500)),
}
#: Hops shown in the table and the plot (all are in the JSON).
HOPS = ("render_to_browser_ms", "analysed_to_router_ms", "end_to_end_ms", "render_to_computed_ms")
#: A gap between two received frames longer than this many frame intervals is a freeze.
FREEZE_INTERVALS = 3


def path_for(axis: str, value: float) -> NetPath:
    """One direction of the emulated path for ``axis`` at ``value``."""
    if axis == "delay":
        return NetPath(delay_ms=value)
    if axis == "jitter":
        return NetPath(delay_ms=50.0, jitter_ms=value)
    if axis == "loss":
        return NetPath(loss_pct=value)
    if axis == "rate":
        return NetPath(rate_kbps=value) if value else NetPath()
    raise ValueError(f"no axis {axis!r}; known: {', '.join(AXES)}")


def profile_for(axis: str, value: float, where: str) -> Profile:
    """The session's profile: ``axis`` at ``value`` on ``where`` (a path, or all three)."""
    one = path_for(axis, value)
    paths = ("media", "reports", "results") if where == "all" else (where,)
    return Profile(name=f"{axis}-{value:g}", **{p: one for p in paths})


def freezes(rows: Sequence[csvrow.Row], fps: float) -> tuple[int, float]:
    """Gaps longer than ``FREEZE_INTERVALS`` frame intervals between frames the client received,
    per session: how many, and the time frozen beyond one interval each (s)."""
    limit_ns = FREEZE_INTERVALS * 1e9 / fps
    by_session: dict[str, list[int]] = {}
    for r in rows:
        if r.t_browser_recv_ns is not None:
            by_session.setdefault(r.session_id, []).append(r.t_browser_recv_ns)
    count, frozen_ns = 0, 0.0
    for times in by_session.values():
        times.sort()
        for a, b in itertools.pairwise(times):
            if b - a > limit_ns:
                count += 1
                frozen_ns += b - a - 1e9 / fps
    return count, frozen_ns / 1e9


def browser_stats(files: Sequence[Path]) -> dict[str, float | None]:
    """The pages' own getStats figures over the session (Chromium clients; else empty)."""
    loaded = report.load(files)
    stats = [s for rec in loaded.records.values() for s in rec.stats]
    if not stats:
        return {}
    last = max(stats, key=lambda s: s.t_router_recv_ns)
    first = min(stats, key=lambda s: s.t_router_recv_ns)
    seconds = (last.t_router_recv_ns - first.t_router_recv_ns) / 1e9
    bits = None
    if last.bytes_received is not None and first.bytes_received is not None and seconds > 0:
        bits = (last.bytes_received - first.bytes_received) * 8 / seconds / 1000
    jb = [s.jitter_buffer_ms for s in stats if s.jitter_buffer_ms is not None]
    return {
        "freeze_count": last.freeze_count,
        "freezes_s": None if last.freezes_ms is None else last.freezes_ms / 1000,
        "jitter_buffer_ms_median": statistics.median(jb) if jb else None,
        "received_kbps": bits,
        "frames_dropped": last.frames_dropped,
    }


def measure(
    broker_url: str, clients: str, fps: float, seconds: float, axis: str, value: float,
    where: str, topics: dict[str, str], out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """One point: one session on a fresh stack with the profile of ``axis`` at ``value``."""
    prof = profile_for(axis, value, where)
    name = f"{clients}-{axis}-{value:g}"
    r = e2e.run_point(broker_url, None, clients, fps, 1, seconds, topics, out_dir,
                      network=prof, name=name)  # fmt: skip
    files = [Path(f) for f in r["csv_files"]]
    rows = report.load(files).rows if files else []
    n, frozen = freezes(rows, fps)
    return {
        "axis": axis,
        "value": value,
        "path": where,
        "profile": prof.name,
        **{k: r[k] for k in ("frames", "ok", "missed", "skipped_by_simulator", "kept")},
        "l2_mean_px": r["l2_mean_px"],
        "freezes": n,
        "frozen_s": round(frozen, 3),
        "latency_ms": r["latency_ms"],
        "browser": browser_stats(files) if clients == "chromium" and files else {},
        "failures": r["failures"],
        "load_avg_1m_before": r["load_avg_1m_before"],
    }


def _f(v: object, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(points: Sequence[Mapping[str, Any]]) -> str:
    head = ["axis", "value", "due", "kept", "missed", "L2 px", "freezes (s)"]
    head += [f"{h.removesuffix('_ms')} p50/p99" for h in HOPS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        lat = p["latency_ms"]
        cells = [p["axis"], f"{p['value']:g}", str(p["frames"]), _f(p["kept"], ".1%"),
                 str(p["missed"]), _f(p["l2_mean_px"], ".2f"),
                 f"{p['freezes']} ({p['frozen_s']:.2f})"]  # fmt: skip
        for h in HOPS:
            s = lat.get(h, {})
            cells.append(f"{_f(s.get('p50'))} / {_f(s.get('p99'))}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """One panel per measure; one line per axis against its own values (x: each axis's value
    as a fraction of its largest, labelled with the values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_seen = [a for a in AXES if any(p["axis"] == a for p in points)]
    measures: list[tuple[str, str]] = [
        ("kept", "frames due with an L2 row (%)"),
        ("l2_mean_px", "mean L2 error (px)"),
        ("freezes", "freezes (gaps > 3 frames)"),
        *((h, f"{h.removesuffix('_ms').replace('_', ' ')} p50 (ms)") for h in HOPS),
    ]
    fig, grid = plt.subplots(len(axes_seen), len(measures), figsize=(3.1 * len(measures),
                             2.6 * len(axes_seen)), squeeze=False)  # fmt: skip
    for i, axis in enumerate(axes_seen):
        pts = sorted((p for p in points if p["axis"] == axis), key=lambda p: p["value"])
        xs = [p["value"] for p in pts]
        uncapped = axis == "rate" and 0 in xs  # no cap is the most bandwidth: on the right
        if uncapped:
            right = max(xs) * 1.5
            pts = [*pts[1:], pts[0]]
            xs = [*xs[1:], right]
        for j, (key, label) in enumerate(measures):
            ax = grid[i][j]
            if key in HOPS:
                p50 = [p["latency_ms"].get(key, {}).get("p50") for p in pts]
                p99 = [p["latency_ms"].get(key, {}).get("p99") for p in pts]
                ax.plot(xs, p50, "o-", ms=3, label="p50")
                ax.plot(xs, p99, "x--", ms=3, label="p99")
                if i == 0 and j == len(measures) - 1:
                    ax.legend(fontsize=7)
            else:
                ys = [p[key] * 100 if key == "kept" else p[key] for p in pts]
                ax.plot(xs, ys, "o-", ms=3)
            if axis == "rate":
                ax.set_xscale("log")
                ax.minorticks_off()
            if uncapped:
                ax.set_xticks(xs, [f"{x:g}" for x in xs[:-1]] + ["none"])
            ax.set_xlabel(AXES[axis][0], fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if i == 0:
                ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", choices=["python", "chromium"], default="python")
    parser.add_argument("--path", choices=["media", "reports", "results", "all"],
                        default="media", help="where the emulated network is")  # fmt: skip
    parser.add_argument("--axes", default=",".join(AXES), help="comma-separated: " + ",".join(AXES))
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="streaming per point")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--metrics-dir", type=Path, default=ROOT / "metrics")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="an earlier run's JSON: its table, plot again"
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        earlier = json.loads(args.replot.read_text())
        print(write_outputs(earlier, args.replot.parent, args.replot.stem))
        return 0
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    for a in axes:
        if a not in AXES:
            parser.error(f"--axes: no axis {a!r}; known: {', '.join(AXES)}")
    set_host_addresses(["127.0.0.1"])
    stem = f"sweep-{args.clients}-{args.path}"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir = args.metrics_dir / f"sweep-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    topics = private_topics(f"sweep-{uuid.uuid4().hex[:8]}")

    def on_sigterm(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        broker = local_pulsar.start()
    except local_pulsar.PulsarError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 1
    points: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    try:
        for axis in axes:
            for value in AXES[axis][1]:
                if value == 0 and axis != "jitter" and baseline is not None:
                    points.append({**baseline, "axis": axis})  # the clear point, measured once
                    continue
                print(f"sweep: {axis} = {value:g} on {args.path} ...", flush=True)
                p = measure(broker.service_url, args.clients, args.fps, args.seconds, axis,
                            value, args.path, topics, out_dir)  # fmt: skip
                print(f"sweep: {axis} {value:g}: kept {p['kept']:.1%}, L2 {p['l2_mean_px']}, "
                      f"freezes {p['freezes']}, failures {p['failures']}", flush=True)  # fmt: skip
                points.append(p)
                if value == 0 and axis != "jitter":
                    baseline = p
    except KeyboardInterrupt:
        print("\nsweep: interrupted; stopped what it started; no results written", flush=True)
        return 130
    except RuntimeError as exc:
        print(f"sweep: {exc}; see the service logs in {out_dir}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        delete_topics(broker.admin_url, topics)
        if broker.started_here and not os.environ.get("CAROM_KEEP_PULSAR"):
            local_pulsar.stop(quiet=True)
    result = {
        "bench": "sweep",
        "when": when,
        "machine": e2e.machine(),
        "clients": args.clients,
        "path": args.path,
        "fps": args.fps,
        "seconds": args.seconds,
        "points": points,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_outputs(result, args.results_dir, stem))
    return 0


def write_outputs(result: Mapping[str, Any], directory: Path, stem: str) -> str:
    """``<stem>.md`` and ``<stem>.png`` from a run's result; the markdown, to print."""
    title = (f"Carom on an emulated network: {result['clients']} clients, {result['fps']:g} fps, "
             f"{result['seconds']:g} s a point, impaired path: {result['path']} "
             f"({result['when']})")  # fmt: skip
    plot(result["points"], directory / f"{stem}.png", title)
    md = "\n".join([f"# {title}", "", f"Details: `bench/sweep.py`; figures: `{stem}.json`; "
                    f"plot: `{stem}.png`.", "", table(result["points"]), ""])  # fmt: skip
    (directory / f"{stem}.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
