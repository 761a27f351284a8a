"""Network sweep (issue 20, item 3): tracking error, frames kept, freezes and per-hop latency
against each axis of an emulated network (delay, jitter, loss, bandwidth), measured end to end.

Usage::

    flock /tmp/carom-heavy.lock .venv/bin/python -m bench.sweep \\
        [--clients python|chromium] [--path media|reports|results|all] [--fps 30[,60]] \\
        [--bitrate 0[,500000]] [--axes delay,jitter,loss,rate,profile] [--seconds 10] \\
        [--results-dir bench/results] [--stem NAME]

Every point is one session on a fresh stack (simulator, router, tracker, as ``bench/e2e.py``
runs them: ``e2e.run_point``), its network set at hello (``SessionParams.network``, a profile's
fields), on the local broker (started if needed). One axis moves at a time from a clear network,
on ``--path`` (default the media path: the video's RTP and its RTCP, both ways):

- ``delay``: one-way delay 0, 25, 50, 100, 200 ms;
- ``jitter``: 50 ms of delay with a normal jitter of 0, 5, 10, 20, 40 ms (standard deviation;
  the emulation keeps packets in order, so jitter shows as delay spread, not reordering);
- ``loss``: random loss of 0, 1, 2, 5, 10 % of packets;
- ``rate``: a bandwidth cap of none, 4,000, 2,000, 1,000, 500, 250, 100 kbit/s, 200 ms of queue
  (the ball's video is ~250 kbit/s at 30 fps whatever the target: only the last two bind);
- ``profile``: the named profiles (``carom.impairment.PROFILES``: lte, 3g, satellite,
  wifi-congested), each on the three paths as it defines them (``--path`` does not apply).

The grid: every axis is swept at each frame rate of ``--fps`` and each target bitrate of
``--bitrate`` (bits/s; 0: the encoder's own, aiortc's 1 Mbps start then the browser's REMB).

What is written for each point, from the tracker's CSV (every frame due, ``carom.accounting``):
frames due, the share with an L2 row (*kept*), missed and skipped, mean L2, *freezes* (a gap of
more than three frame intervals between two frames the client received: count and time frozen),
and the p50/p99 of every hop; from the session's records (its phases, as the simulator sent
them): the bitrate sent and WebRTC's repairs, the NACKs the receiver sent, the packets they asked
for again and its keyframe requests (PLI/FIR). With Chromium clients the page's getStats
figures are read from the records too (its own freeze count, jitter buffer, bitrate received).
Results: ``<results-dir>/<stem>.json``, ``.md`` and ``.png`` (the stem is
``sweep-<clients>-<path>`` unless ``--stem``; one panel per measure, one row per axis, one line per
frame rate and bitrate).
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
from carom.impairment import PROFILES, Profile
from carom.impairment import Path as NetPath
from carom.signaling import MIN_BITRATE
from carom_local import pulsar as local_pulsar
from carom_local.run import delete_topics, private_topics
from carom_runtime.ice import set_host_addresses
from carom_tracker import csvrow, report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

Value = float | str
"""A point on an axis: a number, or a named profile's name (``profile``)."""
#: Each axis: its unit, its values, and the path a value gives (on a clear network). The first
#: value of every axis but ``jitter`` is the clear network (measured once per grid cell).
AXES: dict[str, tuple[str, tuple[Value, ...]]] = {
    "delay": ("one-way delay (ms)", (0, 25, 50, 100, 200)),
    "jitter": ("jitter, normal sd (ms), on 50 ms of delay", (0, 5, 10, 20, 40)),
    "loss": ("random loss (%)", (0, 1, 2, 5, 10)),
    "rate": ("bandwidth cap (kbit/s; 0: none)", (0, 4000, 2000, 1000, 500, 250, 100)),
    "profile": ("named profile (carom.impairment)", tuple(PROFILES)),
}
#: Hops shown in the table and the plot (all are in the JSON).
HOPS = ("render_to_browser_ms", "analysed_to_router_ms", "end_to_end_ms", "render_to_computed_ms")
#: A gap between two received frames longer than this many frame intervals is a freeze.
FREEZE_INTERVALS = 3


def is_clear(axis: str, value: Value) -> bool:
    """Whether ``value`` is the clear network on ``axis`` (the baseline every axis shares)."""
    return value in (0, "clear") and axis != "jitter"


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


def profile_for(axis: str, value: Value, where: str) -> Profile:
    """The session's profile: ``axis`` at ``value`` on ``where`` (a path, or all three); a named
    profile as it is (on its own paths)."""
    if axis == "profile":
        return PROFILES[str(value)]
    number = float(value)
    one = path_for(axis, number)
    paths = ("media", "reports", "results") if where == "all" else (where,)
    return Profile(name=f"{axis}-{number:g}", **{p: one for p in paths})


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


def browser_stats(loaded: report.Loaded) -> dict[str, float | None]:
    """The pages' own getStats figures over the session (Chromium clients; else empty)."""
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


def sender_figures(loaded: report.Loaded) -> dict[str, float | int | None]:
    """What the simulator recorded of the session's phases: the bitrate it sent (aiortc follows
    the receiver's REMB) and the receiver's RTCP feedback (``PhaseSummary``: NACKs, the packets
    they asked for again, keyframe requests)."""
    phases = [ph for rec in loaded.records.values() for end in rec.ends for ph in end.phases]
    if not phases:
        return {"sent_kbps": None, "nacks": None, "retransmitted": None, "keyframe_requests": None}
    seconds = sum((ph.t_end_ns - ph.t_start_ns) / 1e9 for ph in phases)
    sent = sum(ph.bytes_sent for ph in phases)
    return {
        "sent_kbps": round(sent * 8 / seconds / 1000, 1) if seconds > 0 else None,
        "nacks": sum(ph.nacks for ph in phases),
        "retransmitted": sum(ph.retransmitted for ph in phases),
        "keyframe_requests": sum(ph.keyframe_requests for ph in phases),
    }


def measure(
    broker_url: str, clients: str, fps: float, bitrate: int, seconds: float, axis: str,
    value: Value, where: str, topics: dict[str, str], out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """One point: one session on a fresh stack with the profile of ``axis`` at ``value``."""
    prof = profile_for(axis, value, where)
    name = f"{clients}-{fps:g}fps-{bitrate // 1000}k-{axis}-{value}"
    r = e2e.run_point(broker_url, None, clients, fps, 1, seconds, topics, out_dir,
                      network=prof, name=name, bitrate=bitrate)  # fmt: skip
    files = [Path(f) for f in r["csv_files"]]
    loaded = report.load(files) if files else None
    rows = loaded.rows if loaded is not None else []
    n, frozen = freezes(rows, fps)
    return {
        "axis": axis,
        "value": value,
        "path": "own" if axis == "profile" else where,
        "profile": prof.name,
        "fps": fps,
        "bitrate": bitrate,
        **{k: r[k] for k in ("frames", "ok", "missed", "skipped_by_simulator", "kept")},
        "l2_mean_px": r["l2_mean_px"],
        "freezes": n,
        "frozen_s": round(frozen, 3),
        "latency_ms": r["latency_ms"],
        **(sender_figures(loaded) if loaded is not None else {}),
        "browser": browser_stats(loaded) if clients == "chromium" and loaded else {},
        "failures": r["failures"],
        "load_avg_1m_before": r["load_avg_1m_before"],
    }


def _f(v: object, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def _v(value: Value) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def _cell(p: Mapping[str, Any]) -> str:
    """A point's grid cell: its frame rate and target bitrate."""
    b = p.get("bitrate", 0)
    return f"{p['fps']:g} fps, " + (f"{b / 1000:g} kbps" if b else "encoder's bitrate")


def table(points: Sequence[Mapping[str, Any]]) -> str:
    chromium = any(p.get("browser") for p in points)
    head = ["fps", "target kbps", "axis", "value", "due", "kept", "missed", "L2 px",
            "freezes (s)", "sent kbps", "nacks / resent / kf"]  # fmt: skip
    head += [f"{h.removesuffix('_ms')} p50/p99" for h in HOPS]
    if chromium:
        head += ["page jb ms", "page recv kbps", "page freezes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        lat = p["latency_ms"]
        b = p.get("bitrate", 0)
        cells = [f"{p['fps']:g}", f"{b / 1000:g}" if b else "auto", p["axis"], _v(p["value"]),
                 str(p["frames"]), _f(p["kept"], ".1%"), str(p["missed"]),
                 _f(p["l2_mean_px"], ".2f"), f"{p['freezes']} ({p['frozen_s']:.2f})",
                 _f(p.get("sent_kbps"), ".0f"),
                 f"{_f(p.get('nacks'), 'd')} / {_f(p.get('retransmitted'), 'd')} / "
                 f"{_f(p.get('keyframe_requests'), 'd')}"]  # fmt: skip
        for h in HOPS:
            st = lat.get(h, {})
            cells.append(f"{_f(st.get('p50'))} / {_f(st.get('p99'))}")
        if chromium:
            br = p.get("browser") or {}
            cells += [_f(br.get("jitter_buffer_ms_median")), _f(br.get("received_kbps"), ".0f"),
                      _f(br.get("freeze_count"), "d")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """One panel per measure; one row per axis, each against its own values, one line per grid
    cell (frame rate, bitrate). The named profiles are categories, in ``PROFILES``' order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_seen = [a for a in AXES if any(p["axis"] == a for p in points)]
    cells = list(dict.fromkeys(_cell(p) for p in points))
    measures: list[tuple[str, str]] = [
        ("kept", "frames due with an L2 row (%)"),
        ("l2_mean_px", "mean L2 error (px)"),
        ("freezes", "freezes (gaps > 3 frames)"),
        ("nacks", "NACKs the receiver sent"),
        ("sent_kbps", "bitrate sent (kbit/s)"),
        *((h, f"{h.removesuffix('_ms').replace('_', ' ')} p50 (ms)") for h in HOPS),
    ]
    fig, grid = plt.subplots(len(axes_seen), len(measures), figsize=(3.1 * len(measures),
                             2.6 * len(axes_seen)), squeeze=False)  # fmt: skip
    for i, axis in enumerate(axes_seen):
        for c, cell in enumerate(cells):
            mine = [p for p in points if p["axis"] == axis and _cell(p) == cell]
            if axis == "profile":
                order = list(AXES["profile"][1])
                pts = sorted(mine, key=lambda p: order.index(p["value"]))
                xs: list[float] = [float(order.index(p["value"])) for p in pts]
            else:
                pts = sorted(mine, key=lambda p: float(p["value"]))
                xs = [float(p["value"]) for p in pts]
            uncapped = axis == "rate" and 0 in xs  # no cap is the most bandwidth: on the right
            if uncapped:
                pts, xs = [*pts[1:], pts[0]], [*xs[1:], max(xs) * 1.5]
            for j, (key, label) in enumerate(measures):
                ax = grid[i][j]
                color = f"C{c}"
                if key in HOPS:
                    p50 = [p["latency_ms"].get(key, {}).get("p50") for p in pts]
                    p99 = [p["latency_ms"].get(key, {}).get("p99") for p in pts]
                    ax.plot(xs, p50, "o-", ms=3, color=color, label=f"p50, {cell}")
                    ax.plot(xs, p99, "x--", ms=3, color=color, label=f"p99, {cell}")
                else:
                    ys = [None if p.get(key) is None else
                          p[key] * 100 if key == "kept" else p[key] for p in pts]  # fmt: skip
                    ax.plot(xs, ys, "o-", ms=3, color=color, label=cell)
                if c == len(cells) - 1:
                    if axis == "rate":
                        ax.set_xscale("log")
                        ax.minorticks_off()
                    if uncapped:
                        ax.set_xticks(xs, [f"{x:g}" for x in xs[:-1]] + ["none"])
                    if axis == "profile":
                        ax.set_xticks(xs, [str(p["value"]) for p in pts], rotation=30)
                    ax.set_xlabel(AXES[axis][0], fontsize=7)
                    ax.tick_params(labelsize=7)
                    ax.grid(True, alpha=0.3)
                    if i == 0:
                        ax.set_title(label, fontsize=8)
                    if i == 0 and j == len(measures) - 1:
                        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _numbers(text: str, what: str, parser: argparse.ArgumentParser) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{what}: comma-separated numbers, not {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", choices=["python", "chromium"], default="python")
    parser.add_argument("--path", choices=["media", "reports", "results", "all"],
                        default="media", help="where the emulated network is")  # fmt: skip
    parser.add_argument("--axes", default=",".join(AXES), help="comma-separated: " + ",".join(AXES))
    parser.add_argument("--fps", default="30", help="frame rates, comma-separated")
    parser.add_argument(
        "--bitrate", default="0", help="bits/s, comma-separated; 0: the encoder's own"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="streaming per point")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--stem", help="the results' file name, without suffix (default: sweep-<clients>-<path>)"
    )
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
    rates = _numbers(args.fps, "--fps", parser)
    bitrates = [int(b) for b in _numbers(args.bitrate, "--bitrate", parser)]
    for b in bitrates:
        if 0 < b < MIN_BITRATE:
            parser.error(f"--bitrate: 0 (the encoder's own) or at least {MIN_BITRATE} bits/s")
    set_host_addresses(["127.0.0.1"])
    stem = args.stem or f"sweep-{args.clients}-{args.path}"
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
    try:
        for fps, bitrate in itertools.product(rates, bitrates):
            baseline: dict[str, Any] | None = None
            for axis in axes:
                for value in AXES[axis][1]:
                    if is_clear(axis, value) and baseline is not None:
                        points.append({**baseline, "axis": axis, "value": value})  # measured once
                        continue
                    where = f"{fps:g} fps, bitrate {bitrate or 'auto'}: {axis} = {_v(value)}"
                    print(f"sweep: {where} on {args.path} ...", flush=True)
                    p = measure(broker.service_url, args.clients, fps, bitrate, args.seconds,
                                axis, value, args.path, topics, out_dir)  # fmt: skip
                    print(f"sweep: {where}: kept {p['kept']:.1%}, L2 {p['l2_mean_px']}, "
                          f"freezes {p['freezes']}, nacks {p.get('nacks')}, "
                          f"failures {p['failures']}", flush=True)  # fmt: skip
                    points.append(p)
                    if is_clear(axis, value):
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
        "fps": rates,
        "bitrate": bitrates,
        "seconds": args.seconds,
        "points": points,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_outputs(result, args.results_dir, stem))
    return 0


def write_outputs(result: Mapping[str, Any], directory: Path, stem: str) -> str:
    """``<stem>.md`` and ``<stem>.png`` from a run's result; the markdown, to print."""
    rates = result["fps"] if isinstance(result["fps"], list) else [result["fps"]]
    title = (f"Carom on an emulated network: {result['clients']} clients, "
             f"{', '.join(f'{r:g}' for r in rates)} fps, {result['seconds']:g} s a point, "
             f"impaired path: {result['path']} ({result['when']})")  # fmt: skip
    points = [{"fps": rates[0], "bitrate": 0, **p} for p in result["points"]]
    plot(points, directory / f"{stem}.png", title)
    md = "\n".join([f"# {title}", "", f"Details: `bench/sweep.py`; figures: `{stem}.json`; "
                    f"plot: `{stem}.png`.", "", table(points), ""])  # fmt: skip
    (directory / f"{stem}.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
