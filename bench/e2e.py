"""End to end: frames kept, L2, per-hop latency and CPU per service for 1, 2, 4, ... sessions.

Usage::

    .venv/bin/python bench/e2e.py [--fps 30,60] [--sessions 1,2,4,8,16,32] [--duration 20]
                                  [--clients python|chromium] [--results-dir bench/results]

Uses the local broker (started if needed, left running if it was) or ``PULSAR_URL``. For every
fps and session count it starts the whole stack afresh (simulator, tracker and router, as
``local/run`` does, on free ports and private topics), runs N client sessions through the router
for ``--duration`` seconds (Python sessions speaking the page's protocol, all in this process; or
N real headless Chromium pages), lets the tracker finish, stops the stack and reads the tracker's
CSV files:

- frames: the frames due, i.e. every frame index of each session's life (``carom.accounting``;
  clients say bye and wait for the router's ``end``, so the last frames are counted too). A frame
  the simulator skipped because it fell behind has its ``not_sent`` row and is due all the same:
  it is a frame the viewer never got;
- kept: the share of those frames with an L2 row (status ok);
- L2 mean and every hop's latency p50/p99 (``carom_tracker.report.figures``);
- CPU per service in cores over the measured window (utime + stime from /proc): simulator,
  router, tracker, the Pulsar broker (when it is the local one), the clients (this process and
  its Chromium), and whatever else ran on the machine meanwhile ("other").

Session counts grow until fewer than 99.5% of frames are kept (or a session fails). Results:
``<results-dir>/e2e.json`` and ``e2e.md`` (``e2e-chromium.*`` with Chromium clients).
Everything it starts is stopped at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from carom import accounting
from carom.impairment import Profile
from carom.schemas import playout_delay
from carom.signaling import SessionParams
from carom_client.session import CaromSession, RouterInfo
from carom_local import pulsar as local_pulsar
from carom_local.run import Stack, StackOptions, delete_topics, private_topics, scrape
from carom_runtime.ice import set_host_addresses
from carom_tracker import csvrow, report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")
KEEP = 0.995
SERVICES = ("simulator", "router", "tracker", "broker", "clients")
HOP_TITLES = {
    "render_to_browser_ms": "render→client",
    "browser_decode_to_analysed_ms": "client analysis",
    "analysed_to_router_ms": "→router",
    "router_to_published_ms": "router→Pulsar",
    "published_to_tracker_ms": "Pulsar→tracker",
    "tracker_to_computed_ms": "tracker join",
    "end_to_end_ms": "render→router",
    "render_to_computed_ms": "render→L2",
}


# --- CPU -----------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process (all its threads), in seconds."""
    f = _stat(pid)
    return None if f is None else (int(f[11]) + int(f[12])) / TICKS


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (f := _stat(int(entry.name))) is not None:
            children[int(f[1])].append(int(entry.name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / TICKS


@dataclass
class CpuProbe:
    """Snapshots of the services' and the clients' CPU; the clients are this process and every
    process below it that is not a service (Chromium and Playwright's driver)."""

    services: dict[str, int]
    first: dict[str, dict[int, float]] = field(default_factory=dict)
    t0: float = 0.0
    busy0: float = 0.0

    def _snapshot(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pid in self.services.items():
            c = cpu_seconds(pid)
            out[name] = {pid: c} if c is not None else {}
        mine = {os.getpid()} | descendants(os.getpid())
        for pid in self.services.values():
            mine -= {pid} | descendants(pid)
        out["clients"] = {p: c for p in mine if (c := cpu_seconds(p)) is not None}
        return out

    def start(self) -> None:
        self.first, self.t0, self.busy0 = self._snapshot(), time.monotonic(), machine_busy_seconds()

    def stop(self) -> dict[str, float | None]:
        """Cores used per service since :meth:`start` (None where it cannot be read)."""
        last, t1, busy1 = self._snapshot(), time.monotonic(), machine_busy_seconds()
        wall = max(t1 - self.t0, 1e-6)
        out: dict[str, float | None] = {"seconds": round(wall, 2)}
        ours = 0.0
        for name in (*self.services, "clients"):
            a, b = self.first.get(name, {}), last.get(name, {})
            if not b:
                out[name] = None
                continue
            used = sum(c - a.get(pid, 0.0) for pid, c in b.items())
            ours += used
            out[name] = round(used / wall, 3)
        out["other"] = round(max(0.0, (busy1 - self.busy0) - ours) / wall, 3)
        return out


# --- the clients ---------------------------------------------------------------------------------


@dataclass
class Drive:
    """What the clients did: their session ids, failures, and the CPU over the window."""

    session_ids: list[str]
    failures: list[str]
    cpu: dict[str, float | None]


async def _python_clients(
    router_url: str,
    n: int,
    fps: float,
    seconds: float,
    window: Callable[[], Awaitable[None]],
    network: Profile | None = None,
    bitrate: int | None = None,
) -> tuple[list[str], list[str]]:
    info = await RouterInfo.fetch(router_url)
    tag = uuid.uuid4().hex[:6]
    params = SessionParams(fps=fps, network=network, bitrate=bitrate)
    sessions = [CaromSession(info, f"e2e-{tag}-{i}", params, keep_live_errors=0) for i in range(n)]
    failures: list[str] = []
    try:
        opened = await asyncio.gather(*(s.open() for s in sessions), return_exceptions=True)
        for s, res in zip(sessions, opened, strict=True):
            if isinstance(res, BaseException):
                failures.append(f"{s.session_id}: {type(res).__name__}: {res}")
        await window()
    finally:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    return [s.session_id for s in sessions], failures


async def _chromium_clients(
    router_url: str,
    n: int,
    fps: float,
    seconds: float,
    window: Callable[[], Awaitable[None]],
    latency: str = "smooth",
    network: Profile | None = None,
    bitrate: int | None = None,
) -> tuple[list[str], list[str]]:
    from carom_client import chromium

    streaming = asyncio.Event()

    async def measured() -> None:
        await streaming.wait()
        await window()

    measuring = asyncio.create_task(measured())
    try:
        params: dict[str, object] = {"fps": fps, "latency": latency}
        if network is not None:  # the page's query takes a profile's fields as JSON
            params["network"] = msgspec.json.encode(network).decode()
        if bitrate is not None:  # the page's input is in kbps
            params["bitrate"] = bitrate / 1000
        pages = await chromium.run_pages(router_url, n, seconds, params, on_streaming=streaming)
        await measuring
    finally:
        measuring.cancel()
        with contextlib.suppress(BaseException):
            await measuring
    failures = [p.line() for p in pages if not p.ok]
    return [p.session_id for p in pages if p.session_id], failures


def drive(
    clients: str,
    router_url: str,
    n: int,
    fps: float,
    seconds: float,
    services: dict[str, int],
    latency: str = "smooth",
    network: Profile | None = None,
    bitrate: int | None = None,
) -> Drive:
    probe = CpuProbe(services)
    cpu: dict[str, float | None] = {}

    async def window() -> None:
        await asyncio.to_thread(probe.start)
        await asyncio.sleep(seconds)
        cpu.update(await asyncio.to_thread(probe.stop))

    if clients == "chromium":
        ids, failures = asyncio.run(
            _chromium_clients(router_url, n, fps, seconds, window, latency, network, bitrate)
        )
    else:
        ids, failures = asyncio.run(
            _python_clients(router_url, n, fps, seconds, window, network, bitrate)
        )
    return Drive(ids, failures, cpu)


# --- the figures ---------------------------------------------------------------------------------


def summarise(rows: Sequence[csvrow.Row]) -> dict[str, Any]:
    """Coverage over every frame due (``carom.accounting``), L2 and per-hop p50/p99.

    Clients end their sessions with bye and wait for the router's ``end``, so the CSV holds a
    row for every frame index of every session, sent or not: nothing is cut off at the end and
    a frame the simulator skipped (``not_sent``) is due and lost like any other.
    """
    fig = report.figures(rows)
    cov = fig["coverage"]
    assert isinstance(cov, accounting.Coverage)
    hops = fig["latency_ms"]
    assert isinstance(hops, dict)
    return {
        "rendered": cov.due - cov.not_sent,
        "frames": cov.due,
        "skipped_by_simulator": cov.not_sent,
        "ok": cov.ok,
        "not_detected": cov.not_detected,
        "missed": cov.missed,
        "no_row": cov.no_row,
        "kept": round(cov.fraction, 5),
        "l2_mean_px": fig["l2_mean"],
        "latency_ms": {
            hop: {"p50": s["p50"], "p99": s["p99"], "n": int(s["n"] or 0)}
            for hop, s in hops.items()
        },
    }


def wait_tracker_settled(tracker_url: str, window_s: float = 2.0, timeout: float = 30.0) -> None:
    """Until the tracker holds nothing and every row it wrote is durable (after its window)."""
    time.sleep(window_s + 0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape(tracker_url)
        if m is not None:
            held = sum(
                m.get(f'carom_tracker_join_held{{what="{w}"}}', 0.0)
                for w in ("pending_truth", "pending_reports")
            )
            written = m.get('carom_tracker_rows_total{outcome="written"}', 0.0)
            durable = m.get('carom_tracker_rows_total{outcome="durable"}', 0.0)
            if held == 0 and written == durable:
                return
        time.sleep(0.5)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack_options(
    out_dir: Path,
    name: str,
    topics: dict[str, str],
    tag: str,
    simulator_args: Sequence[str] = (),
    sessions: int = 0,
) -> StackOptions:
    """A fresh stack on free ports, logs and CSVs under ``out_dir``, its own subscription and
    its own topics (``topics``' names with a suffix of the stack's; delete them with
    ``delete_topics(opts.admin_url, opts.topics)`` once it stopped).

    Its own topics, not only its own subscription: the tracker subscribes from the earliest
    message, so on topics shared with earlier points each point's tracker first re-read and
    re-joined every earlier point's sessions (found in the network sweep, 2026-12-04: from ten
    minutes in, every point's folder held a second copy of a session ten minutes old, and the
    tracker's hop had p99 outliers of 0.3-3.5 s at 60 fps while it drained that history).
    """
    logs = out_dir / f"{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    suffix = uuid.uuid4().hex[:8]
    return StackOptions(
        simulator_port=free_port(), router_port=free_port(),
        webtransport_port=free_port(socket.SOCK_DGRAM), tracker_port=free_port(),
        metrics_dir=str(out_dir), run_name=name,
        topics={kind: f"{topic}-{suffix}" for kind, topic in topics.items()},
        subscription=f"{tag}-{uuid.uuid4().hex[:8]}", log_dir=logs,
        simulator_args=[*simulator_args, "--log-level", "warning"], sessions=sessions,
    )  # fmt: skip


def run_point(
    pulsar_url: str,
    broker_pid: int | None,
    clients: str,
    fps: float,
    n: int,
    seconds: float,
    topics: dict[str, str],
    out_dir: Path,
    latency: str = "smooth",
    network: Profile | None = None,
    name: str = "",
    bitrate: int | None = None,
) -> dict[str, Any]:
    """One measurement on a fresh stack; the stack is stopped on every path."""
    name = name or f"{clients}-{fps:g}fps-{n}"
    opts = stack_options(out_dir, name, topics, "e2e", sessions=n)
    stack = Stack(pulsar_url, opts)
    load = os.getloadavg()[0]
    try:
        stack.start()
        services = stack.pids()
        if broker_pid is not None:
            services["broker"] = broker_pid
        d = drive(clients, stack.router_url, n, fps, seconds, services, latency, network, bitrate)
        wait_tracker_settled(stack.tracker_url)
    finally:
        stack.stop()
        delete_topics(opts.admin_url, opts.topics)
    files = [f for sid in d.session_ids if (f := stack.run_dir / f"{sid}.csv").exists()]
    rows = report.load(files).rows if files else []
    missing = [sid for sid in d.session_ids if not (stack.run_dir / f"{sid}.csv").exists()]
    return {
        "clients": clients,
        "fps": fps,
        "sessions": n,
        "seconds": seconds,
        "load_avg_1m_before": round(load, 2),
        "failures": d.failures + [f"{sid}: no CSV rows" for sid in missing],
        **summarise(rows),
        "cpu_cores": d.cpu,
        "csv_dir": str(stack.run_dir),
        "csv_files": [str(f) for f in files],
        "latency": sorted({r.latency or "?" for r in rows}),
    }


# --- output --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "arch": platform.machine(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def _ms(v: object) -> str:
    return f"{v:.1f}" if isinstance(v, float) else "-"


def _cores(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else "-"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    runs: list[dict[str, Any]] = result["runs"]
    who = (
        "N headless Chromium pages (live_client.html)"
        if result["clients"] == "chromium"
        else "N Python client sessions in one process (the page's protocol and centroid)"
    )
    lines = [
        f"# End to end ({result['when']})"
        + (f", latency {result['latency']}" if result.get("latency", "smooth") != "smooth" else ""),
        "",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), {m['arch']}, Python {m['python']}; "
        f"load average {m['load_avg_1m_at_start']} at the start. Everything (broker, services, "
        f"clients) shares these cores.",
        "",
        f"`bench/e2e.py`: a fresh stack per row, {who}, "
        f"{result['seconds']:g} s per row. *Frames*: due (every frame index of every "
        "session's life, docs/accounting.md), including those the simulator skipped when it "
        "fell behind (*not sent*, counted as lost); *kept*: share of the frames due with an L2 "
        "row (status ok). CPU in cores over the window; *other* "
        "= the rest of the machine. Playout mode (the CSV's `latency` column): "
        f"{result.get('latency', 'smooth')}.",
        "",
        "| fps | sessions | frames | not sent | kept | L2 mean px | render→router p50 / p99 ms "
        "| render→L2 p50 / p99 ms | CPU sim / router / tracker / broker / clients / other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lat, cpu = r["latency_ms"], r["cpu_cores"]
        fail = f" ({len(r['failures'])} failed)" if r["failures"] else ""
        l2 = f"{r['l2_mean_px']:.3f}" if isinstance(r["l2_mean_px"], float) else "-"
        cells = [
            f"{r['fps']:g}", f"{r['sessions']}{fail}", str(r["frames"]),
            str(r.get("skipped_by_simulator", 0)), f"{r['kept']:.2%}", l2,
            f"{_ms(lat['end_to_end_ms']['p50'])} / {_ms(lat['end_to_end_ms']['p99'])}",
            f"{_ms(lat['render_to_computed_ms']['p50'])} / "
            f"{_ms(lat['render_to_computed_ms']['p99'])}",
            " / ".join(_cores(cpu.get(k)) for k in (*SERVICES, "other")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Largest session count that keeps ≥ 99.5% of frames:"]
    for fps, best in result["largest_kept"].items():
        more = "" if result["limit_found"].get(fps) else " (every count tried kept them)"
        lines.append(f"- {fps} fps: {best if best else 'none'}{more}")
    hops = list(HOP_TITLES)[:6]
    lines += [
        "",
        "Per hop, p50 / p99 ms:",
        "",
        "| fps | sessions | " + " | ".join(HOP_TITLES[h] for h in hops) + " |",
        "|---|---|" + "---|" * len(hops),
    ]
    for r in runs:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['fps']:g} | {r['sessions']} | "
            + " | ".join(f"{_ms(lat[h]['p50'])} / {_ms(lat[h]['p99'])}" for h in hops)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", default="30,60", help="comma-separated")
    parser.add_argument("--sessions", default="1,2,4,8,16,32", help="comma-separated, growing")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--clients", choices=["python", "chromium"], default="python")
    parser.add_argument("--warmup", type=float, metavar="SECONDS",
                        help="an unmeasured one-session run first (default 60 s when this run "
                        "starts the broker, else 0): a broker just started spends its first "
                        "minute compiling (bench/floor.py measured it)")  # fmt: skip
    parser.add_argument("--latency", default="smooth", metavar="MODE",
                        help="the pages' playout mode (chromium): smooth, interactive or MIN-MAX "
                        "ms; results go to e2e-chromium-<mode>.md unless smooth")  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--metrics-dir", type=Path, default=ROOT / "metrics",
                        help="the tracker CSVs go here, a folder per bench run")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        playout_delay(args.latency)
    except ValueError as exc:
        parser.error(f"--latency: {exc}")
    if args.latency != "smooth" and args.clients != "chromium":
        parser.error("--latency is a browser's playout mode: add --clients chromium")
    set_host_addresses(["127.0.0.1"])
    stem = "e2e" if args.clients == "python" else "e2e-chromium"
    if args.latency != "smooth":
        stem += f"-{args.latency}"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir = args.metrics_dir / f"e2e-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    tag = uuid.uuid4().hex[:8]
    topics = private_topics(f"e2e-{tag}")

    def on_sigterm(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    info = machine()
    print(f"e2e: {info}", flush=True)
    try:
        broker = local_pulsar.start()
    except local_pulsar.PulsarError as exc:
        print(f"e2e: {exc}", file=sys.stderr)
        return 1
    broker_pid = local_pulsar._pid() if broker.admin_url.startswith("http://127.0.0.1") else None
    runs: list[dict[str, Any]] = []
    largest: dict[str, int] = {}
    limit_found: dict[str, bool] = {}
    try:
        warmup = args.warmup if args.warmup is not None else 60.0 if broker.started_here else 0.0
        if warmup > 0:
            print(f"e2e: warm-up, one session {warmup:g} s (not measured) ...", flush=True)
            run_point(broker.service_url, None, args.clients, _floats(args.fps)[0], 1, warmup,
                      topics, out_dir / "warmup", args.latency)  # fmt: skip
        for fps in _floats(args.fps):
            largest[f"{fps:g}"], limit_found[f"{fps:g}"] = 0, False
            for n in _ints(args.sessions):
                print(f"e2e: {args.clients} clients, {fps:g} fps, {n} session(s) ...", flush=True)
                r = run_point(broker.service_url, broker_pid, args.clients, fps, n,
                              args.duration, topics, out_dir, args.latency)  # fmt: skip
                runs.append(r)
                brief = {k: r[k] for k in ("frames", "ok", "kept", "l2_mean_px", "failures")}
                print(f"e2e: {fps:g} fps x {n}: {brief}, cpu {r['cpu_cores']}", flush=True)
                if r["failures"] or r["kept"] < KEEP:
                    limit_found[f"{fps:g}"] = True
                    break
                largest[f"{fps:g}"] = n
    except KeyboardInterrupt:
        print("\ne2e: interrupted; stopped what it started; no results written", flush=True)
        return 130
    except RuntimeError as exc:  # a service did not start
        print(f"e2e: {exc}; see the service logs in {out_dir}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        delete_topics(broker.admin_url, topics)
        if broker.started_here and not os.environ.get("CAROM_KEEP_PULSAR"):
            local_pulsar.stop(quiet=True)
    result = {
        "bench": "e2e",
        "when": when,
        "machine": info,
        "clients": args.clients,
        "latency": args.latency,
        "seconds": args.duration,
        "keep_threshold": KEEP,
        "runs": runs,
        "largest_kept": largest,
        "limit_found": limit_found,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.results_dir / f"{stem}.md").write_text(md)
    print(md)
    print(f"e2e: wrote {args.results_dir / f'{stem}.json'} and {stem}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
