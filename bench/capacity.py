"""Capacity inputs: what one session costs each component, in cores, memory, messages and bytes.

Usage (heavy: it starts the services and Chromium; on a shared machine take the lock)::

    flock /tmp/carom-heavy.lock .venv/bin/python bench/capacity.py \\
        [--fps 30,60] [--sessions 2,4] [--chromium 30:1,60:1] [--duration 20] [--idle 8]

Why: the capacity model (how many nodes serve 100 / 1,000 / 10,000 sessions) needs a per-session
cost for every component, and the other benches give throughput ceilings (router reports/s,
tracker frames/s, broker msg/s) or totals per run (``e2e.md``), not a cost per session with the
stack's fixed cost taken out. Wall-clock throughput on this shared 2-vCPU machine moves with
whatever else runs; CPU-seconds a process spent per wall-second (utime + stime from
``/proc/<pid>/stat``) move much less, so that is what is measured.

For every point (fps, client kind, N sessions) it starts a fresh stack exactly as ``bench/e2e.py``
does (``carom_local.run.Stack`` on free ports and private topics, the local broker started if
needed and left running if it was), and:

1. *idle*: the stack up with no session, ``--idle`` seconds: each process's cores and memory;
2. *loaded*: N sessions (``bench/e2e.py``'s Python clients: the page's protocol and centroid in
   this process; or N headless Chromium pages, ``carom_client.chromium``) for ``--duration``
   seconds, from ``--settle`` seconds after every session streams;
3. per session = (loaded - idle) / N, per process: cores, RSS and PSS (``/proc/<pid>/smaps_rollup``:
   shared pages split, which matters for Chromium's many processes), bytes written to storage
   (``/proc/<pid>/io`` ``write_bytes``: the tracker's CSV, the broker's journal and ledgers);
   per topic, from the broker's own counters (``/admin/v2/.../stats``): messages and bytes in
   (published) and out (delivered to every subscription and reader);
4. the video each session was sent (the simulator's ``bytes_sent`` per phase, from the
   tracker's session records) and the share of frames due that kept an L2 row (the point is only
   a cost if the stack kept up).

With Python clients a second router (``router-fanout``) runs on the same topics with no session
of its own: every router instance reads every result on the errors topic and forwards only its
own sessions' (``carom_router.router``), so its cores are the price one router pays for the other
routers' sessions: the term that grows with routers x sessions in the model.

Per fps, the per-session cost is also fitted over the Python points (least squares through the
origin of ``loaded - idle`` against N). Results: ``<results-dir>/capacity.json`` and
``capacity.md``. Everything it starts is stopped at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import e2e  # noqa: E402
from carom_local import pulsar as local_pulsar  # noqa: E402
from carom_local.run import Service, Stack, delete_topics, private_topics  # noqa: E402
from carom_runtime.ice import set_host_addresses  # noqa: E402
from carom_tracker import records, report  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: Components in the order the tables show them.
COMPONENTS = ("simulator", "router", "tracker", "recorder", "broker", "client", "chromium",
              "driver", "router-fanout")  # fmt: skip
TOPICS = ("truth", "centroids", "errors")


# --- reading /proc -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One process at one instant."""

    cpu_s: float
    """utime + stime, all threads, seconds."""
    rss_kb: int
    pss_kb: int
    write_bytes: int
    """Bytes this process caused to be written to storage (``/proc/<pid>/io``)."""


def _kb(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def read_proc(pid: int) -> Proc | None:
    """The process's CPU, memory and storage writes; None when it is gone."""
    cpu = e2e.cpu_seconds(pid)
    if cpu is None:
        return None
    base = Path(f"/proc/{pid}")
    try:
        status = (base / "status").read_text()
    except OSError:
        return None
    try:
        pss = _kb((base / "smaps_rollup").read_text(), "Pss:")
    except OSError:
        pss = 0
    try:
        written = _kb((base / "io").read_text(), "write_bytes:")
    except OSError:
        written = 0
    return Proc(cpu, _kb(status, "VmRSS:"), pss, written)


def _exe(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def groups(services: Mapping[str, int], me: int) -> dict[str, set[int]]:
    """Which processes make up each component: the services by pid, then this process (the
    Python clients) as ``client``, and its other descendants as ``chromium`` (any Chromium
    process) or ``driver`` (Playwright's)."""
    out = {name: {pid} for name, pid in services.items()}
    rest = e2e.descendants(me)
    for pid in services.values():
        rest -= {pid} | e2e.descendants(pid)
    out["client"] = {me}
    for pid in rest:
        kind = "chromium" if "chrom" in Path(_exe(pid)).name else "driver"
        out.setdefault(kind, set()).add(pid)
    return out


Snapshot = dict[str, dict[int, Proc]]


def snapshot(services: Mapping[str, int]) -> Snapshot:
    out: Snapshot = {}
    for name, pids in groups(services, os.getpid()).items():
        out[name] = {pid: p for pid in pids if (p := read_proc(pid)) is not None}
    return out


@dataclass(frozen=True)
class Usage:
    """A component over a window: cores and storage writes per second, memory at its end."""

    cores: float
    write_bps: float
    rss_mb: float
    pss_mb: float


def usage(first: Snapshot, last: Snapshot, seconds: float) -> dict[str, Usage]:
    """Per component, what it used between two snapshots (processes that appeared in between
    count from zero; those that ended are not counted: none should, in a window)."""
    out: dict[str, Usage] = {}
    for name, procs in last.items():
        if not procs:
            continue
        a = first.get(name, {})
        cpu = sum(p.cpu_s - (a[pid].cpu_s if pid in a else 0.0) for pid, p in procs.items())
        wrote = sum(
            p.write_bytes - (a[pid].write_bytes if pid in a else 0) for pid, p in procs.items()
        )
        out[name] = Usage(
            cores=round(cpu / seconds, 4),
            write_bps=round(max(0, wrote) / seconds, 1),
            rss_mb=round(sum(p.rss_kb for p in procs.values()) / 1024, 1),
            pss_mb=round(sum(p.pss_kb for p in procs.values()) / 1024, 1),
        )
    return out


# --- the broker's counters -----------------------------------------------------------------------


def topic_counters(admin_url: str, topic: str) -> dict[str, float]:
    """The broker's cumulative counters for one topic (all zero when it cannot say)."""
    path = topic.replace("persistent://", "persistent/")
    keys = ("msgInCounter", "bytesInCounter", "msgOutCounter", "bytesOutCounter")
    try:
        with urllib.request.urlopen(f"{admin_url}/admin/v2/{path}/stats", timeout=5) as r:
            stats = json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return dict.fromkeys(keys, 0.0)
    return {k: float(stats.get(k, 0)) for k in keys}


def topic_rates(
    first: Mapping[str, Mapping[str, float]], last: Mapping[str, Mapping[str, float]], s: float
) -> dict[str, dict[str, float]]:
    """Per topic kind: messages and bytes per second in (published) and out (delivered)."""
    names = {"msgInCounter": "msg_in", "bytesInCounter": "bytes_in",
             "msgOutCounter": "msg_out", "bytesOutCounter": "bytes_out"}  # fmt: skip
    return {
        kind: {
            short: round((last[kind].get(k, 0.0) - first[kind].get(k, 0.0)) / s, 2)
            for k, short in names.items()
        }
        for kind in last
    }


# --- per-session arithmetic (tests/bench/test_capacity.py) ---------------------------------------


def per_session(idle: Mapping[str, Usage], loaded: Mapping[str, Usage], n: int) -> dict[str, Any]:
    """(loaded - idle) / n for each component; a component absent at idle (Chromium) counts
    from zero."""
    zero = Usage(0.0, 0.0, 0.0, 0.0)
    out: dict[str, Any] = {}
    for name, u in loaded.items():
        i = idle.get(name, zero)
        out[name] = {
            "cores": round((u.cores - i.cores) / n, 4),
            "write_bps": round((u.write_bps - i.write_bps) / n, 1),
            "rss_mb": round((u.rss_mb - i.rss_mb) / n, 2),
            "pss_mb": round((u.pss_mb - i.pss_mb) / n, 2),
        }
    return out


def fit_through_origin(points: Sequence[tuple[float, float]]) -> float | None:
    """The slope b of y = b * n that fits the points best (least squares); None without any."""
    den = sum(n * n for n, _ in points)
    return None if den == 0 else sum(n * y for n, y in points) / den


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Slope and intercept of the least-squares line through the points; None unless at least
    two distinct x."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def video_bps(recs: Sequence[records.SessionRecords]) -> float | None:
    """Mean bits per second the simulator sent a session, over every phase of every session."""
    rates = []
    for r in recs:
        sent = sum(ph.bytes_sent for ph in r.phases)
        span = sum(ph.t_end_ns - ph.t_start_ns for ph in r.phases)
        if span > 0:
            rates.append(8e9 * sent / span)
    return round(sum(rates) / len(rates), 1) if rates else None


def fits(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per fps, over the Python points: each component's cores and storage writes per session
    (slope through the origin of loaded - idle against N), topic messages and bytes per session
    (the same, loaded only: an idle stack publishes nothing), and the fan-out router's cores per
    1,000 error messages/s it reads."""
    out: dict[str, dict[str, Any]] = {}
    for fps in sorted({r["fps"] for r in runs if r["clients"] == "python"}):
        pts = [r for r in runs if r["clients"] == "python" and r["fps"] == fps and r["ok"]]
        if not pts:
            continue
        comp: dict[str, dict[str, float | None]] = {}
        for name in COMPONENTS:
            have = [r for r in pts if name in r["per_session"]]
            if not have:
                continue
            comp[name] = {
                m: _round(fit_through_origin(
                    [(r["sessions"], r["per_session"][name][m] * r["sessions"]) for r in have]
                ), 4)
                for m in ("cores", "write_bps", "pss_mb")
            }  # fmt: skip
        topics = {
            kind: {
                m: _round(
                    fit_through_origin([(r["sessions"], r["topics"][kind][m]) for r in pts]), 2
                )
                for m in ("msg_in", "bytes_in", "msg_out", "bytes_out")
            }
            for kind in TOPICS
        }
        fan = [
            (
                r["topics"]["errors"]["msg_in"],
                r["per_session"]["router-fanout"]["cores"] * r["sessions"],
            )
            for r in pts
            if "router-fanout" in r["per_session"]
        ]
        slope = fit_through_origin(fan)  # cores per error message/s read
        out[f"{fps:g}"] = {
            "points": [r["sessions"] for r in pts],
            "per_session": comp,
            "topics_per_session": topics,
            "fanout_cores_per_1k_error_msgs": _round(None if slope is None else slope * 1000, 4),
        }
    return out


def page_fits(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per fps, over the Chromium points: a page's cost. With two or more page counts, the
    browser's (``chromium``) cores and PSS are split into a cost per page (the slope) and the
    browser's own (the intercept); with one, the whole browser over its pages. The services'
    cost per page as for the Python sessions (through the origin)."""
    out: dict[str, dict[str, Any]] = {}
    for fps in sorted({r["fps"] for r in runs if r["clients"] == "chromium"}):
        pts = [r for r in runs if r["clients"] == "chromium" and r["fps"] == fps and r["ok"]]
        if not pts:
            continue
        browser: dict[str, Any] = {}
        for m in ("cores", "pss_mb"):
            xy = [(float(r["sessions"]), float(r["loaded"]["chromium"][m])) for r in pts
                  if "chromium" in r["loaded"]]  # fmt: skip
            line = fit_line(xy)
            if line is not None:
                browser[m] = {"per_page": round(line[0], 4), "browser": round(line[1], 4)}
            elif xy:
                browser[m] = {"whole_browser_per_page": round(xy[0][1] / xy[0][0], 4)}
        services = {
            name: _round(fit_through_origin(
                [(r["sessions"], r["per_session"][name]["cores"] * r["sessions"]) for r in pts
                 if name in r["per_session"]]
            ), 4)
            for name in ("simulator", "router", "tracker", "broker", "driver")
        }  # fmt: skip
        out[f"{fps:g}"] = {
            "points": [r["sessions"] for r in pts],
            "chromium": browser,
            "services_cores_per_page": services,
        }
    return out


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


# --- one point -----------------------------------------------------------------------------------


def _fanout_router(stack: Stack, out_dir: Path) -> Service:
    """A second router on the stack's topics, with no session of its own."""
    o = stack.opts
    http = e2e.free_port()
    argv = [sys.executable, "-m", "carom_router", "--pulsar-url", stack.pulsar_url,
            "--http-port", str(http), "--webtransport-port", str(e2e.free_port(socket.SOCK_DGRAM)),
            "--simulator-url", stack.simulator_url, "--instance", "capacity-fanout",
            "--channels-metrics-csv", str(out_dir / "fanout-channels.csv")]  # fmt: skip
    for kind, topic in sorted(o.topics.items()):
        argv += [f"--pulsar-topics-{kind}", topic]
    assert o.log_dir is not None
    svc = Service("router-fanout", argv, f"http://127.0.0.1:{http}/health",
                  o.log_dir / "router-fanout.log",
                  {"CAROM_ROUTER__SIMULATOR__TOKEN": o.simulator_token})  # fmt: skip
    try:
        svc.wait_healthy(60)
    except RuntimeError:
        svc.stop()
        raise
    return svc


def run_point(
    broker: local_pulsar.Broker,
    broker_pid: int | None,
    clients: str,
    fps: float,
    n: int,
    args: argparse.Namespace,
    topics: dict[str, str],
    out_dir: Path,
) -> dict[str, Any]:
    """Idle, then N sessions, on a fresh stack; the stack is stopped on every path."""
    name = f"{clients}-{fps:g}fps-{n}"
    opts = e2e.stack_options(out_dir, name, topics, "capacity", sessions=n)
    stack = Stack(broker.service_url, opts)
    fanout: Service | None = None
    ids: list[str] = []
    failures: list[str] = []
    measured: dict[str, Any] = {}
    load = os.getloadavg()[0]
    try:
        stack.start()
        services = stack.pids()
        if clients == "python" and args.fanout:
            fanout = _fanout_router(stack, out_dir)
            services["router-fanout"] = fanout.proc.pid
        if broker_pid is not None:
            services["broker"] = broker_pid
        time.sleep(args.settle)
        a, t0 = snapshot(services), time.monotonic()
        time.sleep(args.idle)
        b, t1 = snapshot(services), time.monotonic()
        idle = usage(a, b, t1 - t0)

        async def window() -> None:
            await asyncio.sleep(args.settle)
            first = await asyncio.to_thread(snapshot, services)
            tc0 = {k: topic_counters(broker.admin_url, opts.topics[k]) for k in TOPICS}
            busy_a, s0 = e2e.machine_busy_seconds(), time.monotonic()
            await asyncio.sleep(args.duration)
            last = await asyncio.to_thread(snapshot, services)
            tc1 = {k: topic_counters(broker.admin_url, opts.topics[k]) for k in TOPICS}
            busy_b, s1 = e2e.machine_busy_seconds(), time.monotonic()
            seconds = s1 - s0
            loaded = usage(first, last, seconds)
            ours = sum(u.cores for u in loaded.values())
            measured.update(
                seconds=round(seconds, 2), idle=idle, loaded=loaded,
                topics=topic_rates(tc0, tc1, seconds),
                other_cores=round(max(0.0, (busy_b - busy_a) / seconds - ours), 3),
            )  # fmt: skip

        stream_s = args.settle + args.duration + 3.0
        if clients == "chromium":
            ids, failures = asyncio.run(
                e2e._chromium_clients(stack.router_url, n, fps, stream_s, window)
            )
        else:
            ids, failures = asyncio.run(
                e2e._python_clients(stack.router_url, n, fps, stream_s, window)
            )
        e2e.wait_tracker_settled(stack.tracker_url)
    finally:
        if fanout is not None:
            fanout.stop()
        stack.stop()
        delete_topics(opts.admin_url, opts.topics)
    files = [f for sid in ids if (f := stack.run_dir / f"{sid}.csv").exists()]
    missing = [sid for sid in ids if not (stack.run_dir / f"{sid}.csv").exists()]
    summary = e2e.summarise(report.load(files).rows if files else [])
    recs = [records.read([records.path_for(f)]) for f in files]
    idle_u: dict[str, Usage] = measured.get("idle", {})
    loaded_u: dict[str, Usage] = measured.get("loaded", {})
    ok = not failures and len(files) == n and summary["kept"] >= e2e.KEEP and bool(loaded_u)
    return {
        "clients": clients,
        "fps": fps,
        "sessions": n,
        "seconds": measured.get("seconds"),
        "load_avg_1m_before": round(load, 2),
        "failures": failures + [f"{sid}: no CSV" for sid in missing],
        "frames": summary["frames"],
        "kept": summary["kept"],
        "skipped_by_simulator": summary["skipped_by_simulator"],
        "ok": ok,
        "idle": {k: vars(v) for k, v in idle_u.items()},
        "loaded": {k: vars(v) for k, v in loaded_u.items()},
        "per_session": per_session(idle_u, loaded_u, n) if loaded_u else {},
        "topics": measured.get("topics", {}),
        "topics_per_session": {
            kind: {m: round(v / n, 2) for m, v in rates.items()}
            for kind, rates in measured.get("topics", {}).items()
        },
        "other_cores": measured.get("other_cores"),
        "video_bps_per_session": video_bps(recs),
        "csv_dir": str(stack.run_dir),
    }


# --- output --------------------------------------------------------------------------------------


def _f(v: object, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def _kbs(v: object) -> str:
    return f"{v / 1000:.1f}" if isinstance(v, int | float) else "-"


def markdown(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    runs: list[dict[str, Any]] = result["runs"]
    lines = [
        f"# Capacity inputs: cost per session per component ({result['when']})",
        "",
        f"Machine: {m['nproc']} vCPUs ({m['cpu_model']}), {m['arch']}, Python {m['python']}; "
        f"load average {m['load_avg_1m_at_start']} at the start. Broker: the local Apache Pulsar "
        f"standalone ({result['broker']}; broker and bookie in one JVM). Everything shares these "
        "cores.",
        "",
        f"Command: `{result['command']}` (code: {result.get('code', 'unknown')})",
        "",
        f"`bench/capacity.py`: per point, a fresh stack; {result['idle_s']:g} s idle (no session), "
        f"then N sessions, measured for {result['duration_s']:g} s from {result['settle_s']:g} s "
        "after all stream. Cores = CPU-seconds (utime + stime, /proc) per wall second. *Per "
        "session* = (loaded - idle) / N. Memory: PSS (RSS with shared pages split) at the end of "
        "the window. Topics: the broker's own counters (in = published, out = delivered to all "
        "subscriptions and readers). `router-fanout`: a second router on the same topics with "
        "no session (it reads every error result, as every router instance does).",
        "",
        "## Per point",
        "",
        "| clients | fps | N | kept | not sent | component | idle cores | loaded cores "
        "| cores / session | PSS MB idle → loaded | PSS MB / session | disk write kB/s / session |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        head = (f"| {r['clients']} | {r['fps']:g} | {r['sessions']} | {r['kept']:.2%} | "
                f"{r['skipped_by_simulator']} |")  # fmt: skip
        for name in COMPONENTS:
            if name not in r["loaded"]:
                continue
            i, lo, ps = r["idle"].get(name, {}), r["loaded"][name], r["per_session"][name]
            lines.append(
                f"{head} {name} | {_f(i.get('cores'))} | {_f(lo['cores'])} | "
                f"**{_f(ps['cores'], 4)}** | {_f(i.get('pss_mb'), 0)} → {_f(lo['pss_mb'], 0)} | "
                f"{_f(ps['pss_mb'], 1)} | {_kbs(ps['write_bps'])} |"
            )
            head = "| | | | | |"
        lines.append(f"{head} *other (rest of the machine)* | | {_f(r['other_cores'])} | | | | |")
    lines += [
        "",
        "## Pulsar topics per session (per point: measured rate / N)",
        "",
        "| clients | fps | N | topic | msg/s in | bytes/s in | B/msg | msg/s out | bytes/s out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for kind in TOPICS:
            t = r["topics_per_session"].get(kind, {})
            size = t["bytes_in"] / t["msg_in"] if t.get("msg_in") else None
            lines.append(
                f"| {r['clients']} | {r['fps']:g} | {r['sessions']} | {kind} | "
                f"{_f(t.get('msg_in'), 2)} | {_f(t.get('bytes_in'), 0)} | {_f(size, 0)} | "
                f"{_f(t.get('msg_out'), 2)} | {_f(t.get('bytes_out'), 0)} |"
            )
    lines += [
        "",
        "Video sent per session (simulator `bytes_sent` over each session's phases): "
        + "; ".join(
            f"{r['clients']} {r['fps']:g} fps x {r['sessions']}: "
            f"{_kbs(r['video_bps_per_session'])} kbit/s"
            for r in runs
        ),
        "",
        "## Fitted per-session cost (Python clients; slope through the origin over N)",
        "",
        "| fps | points N | component | cores / session | PSS MB / session "
        "| disk write kB/s / session |",
        "|---|---|---|---|---|---|",
    ]
    for fps, fit in result["fits"].items():
        pts = ", ".join(map(str, fit["points"]))
        for name, c in fit["per_session"].items():
            lines.append(f"| {fps} | {pts} | {name} | **{_f(c['cores'], 4)}** | "
                         f"{_f(c['pss_mb'], 1)} | {_kbs(c['write_bps'])} |")  # fmt: skip
    lines += ["", "| fps | topic | msg/s in / session | bytes/s in / session | msg/s out / "
              "session | bytes/s out / session |", "|---|---|---|---|---|---|"]  # fmt: skip
    for fps, fit in result["fits"].items():
        for kind, t in fit["topics_per_session"].items():
            lines.append(f"| {fps} | {kind} | {_f(t['msg_in'], 2)} | {_f(t['bytes_in'], 0)} | "
                         f"{_f(t['msg_out'], 2)} | {_f(t['bytes_out'], 0)} |")  # fmt: skip
    lines.append("")
    for fps, fit in result["fits"].items():
        lines.append(
            f"- {fps} fps: a router's cost of reading the other routers' results (fan-out): "
            f"**{_f(fit['fanout_cores_per_1k_error_msgs'], 4)} cores per 1,000 error "
            "messages/s** it reads and drops."
        )
    pages = result.get("page_fits", {})
    if pages:
        lines += ["", "## Chromium pages (headless, painting nothing)", ""]
    for fps, fit in pages.items():
        b = fit["chromium"]
        pts = ", ".join(map(str, fit["points"]))
        parts = []
        for m, unit in (("cores", "cores"), ("pss_mb", "MB PSS")):
            v = b.get(m, {})
            if "per_page" in v:
                parts.append(f"{_f(v['per_page'], 3)} {unit} per page + {_f(v['browser'], 3)} "
                             "for the browser")  # fmt: skip
            elif v:
                parts.append(f"{_f(v['whole_browser_per_page'], 3)} {unit} per page, "
                             "the browser's own cost included")  # fmt: skip
        svc = ", ".join(f"{k} {_f(v, 4)}" for k, v in fit["services_cores_per_page"].items())
        lines.append(f"- {fps} fps (pages: {pts}): Chromium {'; '.join(parts)}. Services, "
                     f"cores per page: {svc}.")  # fmt: skip
    failed = [r for r in runs if not r["ok"]]
    for r in failed:
        lines.append(
            f"- not counted in the fit: {r['clients']} {r['fps']:g} fps x {r['sessions']} "
            f"(kept {r['kept']:.2%}; failures: {r['failures'] or 'none'})"
        )
    return "\n".join(lines) + "\n"


def code_rev(root: Path = ROOT) -> str:
    """The commit measured, with ``+dirty`` when the tree has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _chromium_points(text: str) -> list[tuple[float, int]]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        fps, _, n = item.partition(":")
        out.append((float(fps), int(n or "1")))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", default="30,60", help="Python points: comma-separated")
    parser.add_argument("--sessions", default="2,4", help="Python points: session counts")
    parser.add_argument("--chromium", default="30:1,60:1", metavar="FPS:N,...",
                        help="Chromium points (empty: none)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured loaded")
    parser.add_argument("--idle", type=float, default=8.0, help="seconds measured idle")
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds before each window (start-up costs are not per second)",
    )
    parser.add_argument("--no-fanout", dest="fanout", action="store_false",
                        help="no second router reading the errors topic")  # fmt: skip
    parser.add_argument("--warmup", type=float, metavar="SECONDS",
                        help="an unmeasured one-session run first (default 60 s when this run "
                        "starts the broker, else 0; a broker just started spends its first "
                        "minute compiling)")  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--metrics-dir", type=Path, default=ROOT / "metrics")
    parser.add_argument("--code-rev", default=None,
                        help="the code measured, for the results (default: git HEAD of "
                        "this tree, +dirty with uncommitted changes; give it for an exported "
                        "tree)")  # fmt: skip
    args = parser.parse_args(argv)
    set_host_addresses(["127.0.0.1"])
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir = args.metrics_dir / f"capacity-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    topics = private_topics(f"capacity-{uuid.uuid4().hex[:8]}")
    points = [("python", fps, n) for fps in e2e._floats(args.fps) for n in e2e._ints(args.sessions)]
    points += [("chromium", fps, n) for fps, n in _chromium_points(args.chromium)]

    def on_sigterm(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    info = e2e.machine()
    print(f"capacity: {info}", flush=True)
    try:
        broker = local_pulsar.start()
    except local_pulsar.PulsarError as exc:
        print(f"capacity: {exc}", file=sys.stderr)
        return 1
    broker_pid = local_pulsar._pid() if broker.admin_url.startswith("http://127.0.0.1") else None
    version = local_pulsar.broker_version(broker.admin_url)
    runs: list[dict[str, Any]] = []
    try:
        warmup = args.warmup if args.warmup is not None else 60.0 if broker.started_here else 0.0
        if warmup > 0:
            print(f"capacity: warm-up, one session {warmup:g} s (not measured) ...", flush=True)
            e2e.run_point(broker.service_url, None, "python", 30.0, 1, warmup, topics,
                          out_dir / "warmup")  # fmt: skip
        for clients, fps, n in points:
            print(f"capacity: {clients} {fps:g} fps x {n} ...", flush=True)
            r = run_point(broker, broker_pid, clients, fps, n, args, topics, out_dir)
            runs.append(r)
            brief = {k: r["per_session"].get(k, {}).get("cores") for k in COMPONENTS}
            print(f"capacity: {clients} {fps:g} fps x {n}: kept {r['kept']:.2%}, "
                  f"cores/session {brief}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("\ncapacity: interrupted; stopped what it started; no results written", flush=True)
        return 130
    except RuntimeError as exc:
        print(f"capacity: {exc}; see the service logs in {out_dir}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        delete_topics(broker.admin_url, topics)
        if broker.started_here and not os.environ.get("CAROM_KEEP_PULSAR"):
            local_pulsar.stop(quiet=True)
    result = {
        "bench": "capacity",
        "when": when,
        "machine": info,
        "broker": f"Apache Pulsar {version} at {broker.service_url}",
        "command": shlex.join([".venv/bin/python", "bench/capacity.py", *sys.argv[1:]])
        if argv is None
        else shlex.join(["bench/capacity.py", *argv]),
        "code": args.code_rev or code_rev(),
        "idle_s": args.idle,
        "settle_s": args.settle,
        "duration_s": args.duration,
        "runs": runs,
        "fits": fits(runs),
        "page_fits": page_fits(runs),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.results_dir / "capacity.md").write_text(md)
    print(md)
    print(f"capacity: wrote {args.results_dir / 'capacity.json'} and capacity.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
