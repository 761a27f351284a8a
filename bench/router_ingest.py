"""Router ingest: report datagrams -> Pulsar, through one or two router processes.

Usage::

    flock /tmp/carom-heavy.lock .venv/bin/python bench/router_ingest.py \\
        [--load go|python] [--procs 2] [--sessions 4] [--routers 1] [--seconds 10] [--rate 0]

(starts the local broker unless ``PULSAR_URL`` is set). Results: ``bench/results/router.json`` and
``.md`` (``router-2.*`` with two routers, ``router-paced-RATE.*`` when paced, ``--name`` to choose).

Each router runs as its own process (``--router-pythonpath`` puts another tree first on its
``PYTHONPATH``, to compare a change with the code before it). The load comes from ``--procs``
processes of their own, each holding ``--sessions`` WebTransport sessions (one QUIC connection
each, as a browser makes them), sending valid 36-byte reports flat out or at ``--rate`` per
session:

- ``--load go`` (default): ``bench/wtload``, a compiled client (quic-go, from the Go module proxy),
  one report per QUIC packet as a browser sends them. Built on first use with ``go build``.
- ``--load python``: this script's ``--child`` mode, ``carom_client.webtransport`` clients. A
  Python client spends about what the router spends per report, so on two cores these cannot
  take the router to its ceiling; they stay for machines without Go.

Load processes are split over the routers (process i -> router i mod R). A sync consumer thread in
this process reads the centroid topic; every report is counted by (session, rtp_ts), which the
clients number from 0 in each session, so lost = sent - unique consumed and duplicated = consumed
- unique. Reports the kernel dropped before the router read them (the router's UDP receive buffer
full: ``Udp RcvbufErrors`` in ``/proc/net/snmp``) are lost on the way *to* the router, as on a real
network; they are counted apart.

Figures:

- ingest rate: reports consumed over the span of the router's receive stamps (what the routers
  took in while the load kept them busy);
- router cores: each router's CPU time from ``/proc`` over the load's seconds, and reports/s per
  router core (its reports / its cores): the router's cost per report, whatever shares the cores;
- every other process's cores (load processes, broker, this process's consumer) and the machine's
  busy cores, so the figure says what it was limited by;
- router receive -> published: ``t_published_ns - t_router_recv_ns`` in each message;
- router receive -> consumed: consumer's clock at receipt minus ``t_router_recv_ns``.

``--profile FILE`` records the first router with py-spy (``--py-spy``, default
``/tmp/spy/bin/py-spy``) over the load's seconds, in py-spy's raw (collapsed) format;
``bench/router_profile.py`` sums it by stage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pulsar

from carom import protocol as p
from carom import schemas
from carom_client.session import RouterInfo
from carom_client.webtransport import connect
from carom_local import pulsar as local_pulsar
from carom_runtime.pulsar_io import quiet_logger

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WTLOAD_SRC = HERE / "wtload"
WTLOAD_BIN = Path("/tmp/carom-wtload")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Consumer(threading.Thread):
    """Reads the centroid topic on a thread of its own (sync client: 186k msg/s measured here)."""

    def __init__(self, url: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.client = pulsar.Client(url, logger=quiet_logger())
        self.consumer = self.client.subscribe(
            topic, "bench", initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=10000,
        )  # fmt: skip
        self.sessions: list[str] = []
        self.rtp: list[int] = []
        self.internal_ms: list[float] = []
        self.recv_ns: list[int] = []
        self.delivered_ms: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        last = None
        while not self.halt.is_set():
            try:
                msg = self.consumer.receive(200)
            except pulsar.Timeout:
                if last is not None:
                    self.consumer.acknowledge_cumulative(last)
                    last = None
                continue
            now = time.time_ns()
            data = msg.data()
            c = schemas.decode(data, schemas.Centroid)
            self.sessions.append(c.session_id)
            self.rtp.append(c.rtp_ts)
            self.internal_ms.append((c.t_published_ns - c.t_router_recv_ns) / 1e6)
            self.recv_ns.append(c.t_router_recv_ns)
            self.delivered_ms.append((now - c.t_router_recv_ns) / 1e6)
            last = msg
            if len(self.rtp) % 1000 == 0:  # Exclusive subscription: one ack per thousand
                self.consumer.acknowledge_cumulative(msg)
                last = None

    def wait_for(self, count: int, quiet_s: float = 3.0, limit_s: float = 60.0) -> None:
        """Until ``count`` messages came, or none for ``quiet_s``."""
        t_end = time.monotonic() + limit_s
        seen, since = -1, time.monotonic()
        while len(self.rtp) < count and time.monotonic() < t_end:
            n = len(self.rtp)
            if n != seen:
                seen, since = n, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        self.client.close()


# load processes -----------------------------------------------------------------------------


async def child_load(url: str, sessions: int, seconds: float, rate: float, prefix: str) -> None:
    """``--child``: open the sessions, say ``ready``, wait for a line, load, say ``stopped``, close
    the sessions, print the counts (one JSON line), as bench/wtload does."""
    info = await RouterInfo.fetch(url)
    ids = [f"{prefix}-{i}" for i in range(sessions)]
    wts = await asyncio.gather(
        *(connect(info.webtransport_url, cert_sha256=info.cert_sha256) for _ in ids)
    )
    for wt, sid in zip(wts, ids, strict=True):
        wt.open_stream().write(p.frame(p.Hello(session_id=sid, client="bench")))
    await asyncio.sleep(0.3)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def one(wt: Any) -> tuple[int, int]:
        sent = refused = 0
        t0 = time.monotonic()
        now_ms = time.time_ns() / 1e6
        while (elapsed := time.monotonic() - t0) < seconds:
            if rate and sent > elapsed * rate:
                await asyncio.sleep(0.001)
                continue
            # rtp_ts = seq = the report's index in its session: the consumer counts by it.
            data = p.encode_report(sent, sent, (320.5, 240.5), now_ms, now_ms)
            if wt.send_datagram(data):
                sent += 1
                if sent % 64 == 0:
                    await asyncio.sleep(0)
                    now_ms = time.time_ns() / 1e6
            else:
                refused += 1
                await asyncio.sleep(0.0005)
        return sent, refused

    t0 = time.monotonic()
    counts = await asyncio.gather(*(one(wt) for wt in wts))
    elapsed = time.monotonic() - t0
    print("stopped", flush=True)
    # What aioquic still holds for the congestion window goes out before the close (a close
    # would discard it: 89 of 139,195 reports once).
    for _ in range(100):
        if not any(wt.datagrams_queued() for wt in wts):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    await asyncio.gather(*(wt.close() for wt in wts))
    out = {
        "seconds": elapsed,
        "sessions": [
            {"id": sid, "sent": s, "errors": r} for sid, (s, r) in zip(ids, counts, strict=True)
        ],
    }
    print(json.dumps(out), flush=True)


def build_wtload() -> Path:
    """``go build`` bench/wtload unless the binary is newer than its sources."""
    newest = max(f.stat().st_mtime for f in WTLOAD_SRC.iterdir())
    if WTLOAD_BIN.exists() and WTLOAD_BIN.stat().st_mtime >= newest:
        return WTLOAD_BIN
    go = shutil.which("go") or "/usr/local/go/bin/go"
    subprocess.run([go, "build", "-o", str(WTLOAD_BIN), "."], cwd=WTLOAD_SRC, check=True)
    return WTLOAD_BIN


class Router:
    """One router process on ports of its own."""

    def __init__(self, broker: str, topic: str, sessions: int, pythonpath: str | None) -> None:
        self.http_port, self.wt_port = free_port(), free_port(socket.SOCK_DGRAM)
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "carom_router", "--http-port", str(self.http_port),
             "--webtransport-port", str(self.wt_port), "--pulsar-url", broker,
             "--pulsar-topics-centroids", topic, "--limits-max-report-rate", "1000000",
             "--limits-report-burst", "1000000", "--limits-max-sessions", str(max(64, sessions)),
             "--limits-max-sessions-per-address", str(max(16, sessions)),
             "--log-level", "warning"],
            env=env,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self) -> None:
        for _ in range(300):
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}")
            try:
                httpx.get(f"{self.url}/config", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("router not ready in 60 s")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_load(
    args: argparse.Namespace, i: int, router: Router, run_id: str
) -> subprocess.Popen[str]:
    prefix = f"b{run_id}-p{i}"
    if args.load == "go":
        cmd = [str(build_wtload()), "-addr", f"127.0.0.1:{router.wt_port}", "-sessions",
               str(args.sessions), "-seconds", str(args.seconds), "-rate", str(args.rate),
               "-prefix", prefix]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--child", "--url", router.url, "--sessions",
               str(args.sessions), "--seconds", str(args.seconds), "--rate", str(args.rate),
               "--prefix", prefix]  # fmt: skip
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def read_line(stream: IO[str] | None, what: str) -> str:
    assert stream is not None
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what} ended without output")
    return line.strip()


# measurements -------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """User and system CPU seconds of the main thread (the event loop) and of all the others
    (the Pulsar client's, the publisher's, the errors reader's: all named "python" here)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "main (event loop)" if task.name == str(pid) else "other threads"
        u, s = out.get(name, (0.0, 0.0))
        out[name] = (u + int(fields[11]) / tick, s + int(fields[12]) / tick)
    return out


def cpu_snapshot(
    routers: list[Router], loads: list[subprocess.Popen[str]], pids: dict[str, int | None]
) -> dict[str, float]:
    """CPU seconds so far of every process the figures name."""
    out = {f"router{i}": cpu_seconds(r.proc.pid) for i, r in enumerate(routers)}
    out.update({f"load{i}": cpu_seconds(proc.pid) for i, proc in enumerate(loads)})
    out.update({k: cpu_seconds(v) for k, v in pids.items()})
    return out


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all cores), from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def udp_rcvbuf_errors() -> int:
    lines = [
        ln.split()
        for ln in Path("/proc/net/snmp").read_text().splitlines()
        if ln.startswith("Udp:")
    ]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def metric(text: str, name: str, label: str) -> float:
    m = re.search(rf'^{name}\{{[a-z]+="{label}"\}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def rejected(text: str) -> int:
    total = 0.0
    for m in re.finditer(r"^carom_router_reports_rejected_total\{[^}]*\} ([0-9.e+]+)$", text, re.M):
        total += float(m.group(1))
    return int(total)


def settle(routers: list[Router], quiet_s: float = 1.5, limit_s: float = 120.0) -> int:
    """Wait until no router's received or acknowledged count moves; returns the acked total."""
    t_end, last, since = time.monotonic() + limit_s, None, time.monotonic()
    while time.monotonic() < t_end:
        texts = [r.metrics() for r in routers]
        now = [
            (metric(t, "carom_router_webtransport_total", "datagrams_in"),
             metric(t, "carom_router_reports_published_total", "acked"))
            for t in texts
        ]  # fmt: skip
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.25)
    return int(sum(a for _, a in last or []))


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values or [np.nan]), q)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4, help="per load process")
    parser.add_argument("--procs", type=int, default=2, help="load processes")
    parser.add_argument("--load", choices=("go", "python"), default="go")
    parser.add_argument("--routers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="per session; 0 = flat out")
    parser.add_argument("--name", help="results file name (default from the options)")
    parser.add_argument("--router-pythonpath", help="put first on the routers' PYTHONPATH")
    parser.add_argument("--profile", help="py-spy raw profile of the first router to this file")
    parser.add_argument("--py-spy", default="/tmp/spy/bin/py-spy")
    parser.add_argument("--py-spy-args", default="--gil --nonblocking --rate 100")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child_load(args.url, args.sessions, args.seconds, args.rate, args.prefix))
        return
    if args.load == "go":
        build_wtload()  # before the clock starts
    total_sessions = args.procs * args.sessions
    broker = local_pulsar.start()
    topic = f"persistent://public/default/bench-centroids-{uuid.uuid4().hex[:8]}"
    run_id = uuid.uuid4().hex[:6]
    routers: list[Router] = []
    loads: list[subprocess.Popen[str]] = []
    consumer = Consumer(broker.service_url, topic)
    consumer.start()
    spy: subprocess.Popen[bytes] | None = None
    try:
        per_router = -(-total_sessions // args.routers)
        routers = [
            Router(broker.service_url, topic, per_router, args.router_pythonpath)
            for _ in range(args.routers)
        ]
        for r in routers:
            r.wait_ready()
        loads = [start_load(args, i, routers[i % len(routers)], run_id) for i in range(args.procs)]
        for i, proc in enumerate(loads):
            if read_line(proc.stdout, f"load process {i}") != "ready":
                raise RuntimeError(f"load process {i} did not say ready")
        pids = {"bench": os.getpid(), "broker": local_pulsar._pid()}
        m0 = [r.metrics() for r in routers]
        cpu0 = cpu_snapshot(routers, loads, pids)
        threads0 = thread_cpu(routers[0].proc.pid)
        busy0, drops0 = machine_busy_seconds(), udp_rcvbuf_errors()
        if args.profile:
            spy = subprocess.Popen(
                [args.py_spy, "record", "--pid", str(routers[0].proc.pid), "--format", "raw",
                 "--duration", str(int(args.seconds)), "-o", args.profile,
                 *args.py_spy_args.split()],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.5)
        t0 = time.monotonic()
        for proc in loads:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for i, proc in enumerate(loads):
            if read_line(proc.stdout, f"load process {i}") != "stopped":
                raise RuntimeError(f"load process {i} did not say stopped")
        elapsed = time.monotonic() - t0
        cpu1 = cpu_snapshot(routers, loads, pids)
        threads1 = thread_cpu(routers[0].proc.pid)
        busy1, drops1 = machine_busy_seconds(), udp_rcvbuf_errors()
        outs = [
            json.loads(read_line(proc.stdout, f"load process {i}")) for i, proc in enumerate(loads)
        ]
        if spy is not None:
            spy.wait(60)
        for proc in loads:
            proc.wait(30)
        # A router behind its load is still reading its socket: wait until it has published
        # all it took in, then until the consumer has read all it published.
        acked = settle(routers)
        consumer.wait_for(acked)
        m1 = [r.metrics() for r in routers]
    finally:
        for proc in loads:
            if proc.poll() is None:
                proc.kill()
        for r in routers:
            r.stop()
        consumer.close()
        if broker.started_here:
            local_pulsar.stop()

    def delta(i: int, name: str, label: str) -> int:
        return int(metric(m1[i], name, label) - metric(m0[i], name, label))

    def cores(key: str) -> float:
        return (cpu1[key] - cpu0[key]) / elapsed

    sent_by: dict[str, int] = {}
    per_proc: list[dict[str, Any]] = []
    for i, out in enumerate(outs):
        for s in out["sessions"]:
            sent_by[s["id"]] = s["sent"]
        per_proc.append({
            "router": i % len(routers),
            "sent": sum(s["sent"] for s in out["sessions"]),
            "refused": sum(s["errors"] for s in out["sessions"]),
            "cpu_cores": round(cores(f"load{i}"), 3),
        })  # fmt: skip
    sent = sum(sent_by.values())
    sessions_arr = np.array(consumer.sessions, dtype=object)
    rtp = np.array(consumer.rtp, dtype=np.int64)
    unique = duplicated = phantom = 0
    for sid in set(consumer.sessions):
        got = rtp[sessions_arr == sid]
        u = np.unique(got)
        unique += len(u)
        duplicated += len(got) - len(u)
        phantom += int((u >= sent_by.get(sid, 0)).sum())  # never sent: must be 0
    routers_out: list[dict[str, Any]] = []
    for i in range(len(routers)):
        r_cores = cores(f"router{i}")
        din = delta(i, "carom_router_webtransport_total", "datagrams_in")
        routers_out.append({
            "datagrams_in": din,
            "acked": delta(i, "carom_router_reports_published_total", "acked"),
            "rejected": rejected(m1[i]) - rejected(m0[i]),
            "cpu_cores": round(r_cores, 3),
            "reports_per_s": round(din / elapsed, 1),
            "reports_per_core_s": round(din / elapsed / r_cores, 1) if r_cores else None,
        })  # fmt: skip
    span_s = (max(consumer.recv_ns) - min(consumer.recv_ns)) / 1e9 if consumer.recv_ns else 1.0
    router_cores = sum(r["cpu_cores"] for r in routers_out)
    received = sum(r["datagrams_in"] for r in routers_out)
    result = {
        "bench": "router_ingest",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sessions": total_sessions,
        "paced_rate_per_session": args.rate or None,
        "seconds": round(elapsed, 2),
        "datagrams_sent": sent,
        "client_refused_congestion": sum(pp["refused"] for pp in per_proc),
        "datagrams_received_by_router": received,
        "reports_published_acked": sum(r["acked"] for r in routers_out),
        "reports_consumed": len(consumer.rtp),
        # Over the span the routers were actually receiving (their own receive stamps).
        "ingest_reports_per_s": round(len(consumer.recv_ns) / span_s, 1),
        "router_cpu_cores": round(router_cores, 3),
        "receive_to_published_ms_p50": ms(consumer.internal_ms, 50),
        "receive_to_published_ms_p99": ms(consumer.internal_ms, 99),
        "receive_to_consumed_ms_p50": ms(consumer.delivered_ms, 50),
        "receive_to_consumed_ms_p99": ms(consumer.delivered_ms, 99),
        # Added with the load processes (issue 21).
        "load": args.load,
        "load_procs": args.procs,
        "sessions_per_proc": args.sessions,
        "routers": args.routers,
        "router_pythonpath": args.router_pythonpath,
        "reports_unique_consumed": unique,
        "reports_duplicated": duplicated,
        "reports_never_sent": phantom,
        "reports_lost": sent - unique,
        # Datagrams the kernel dropped on a full UDP receive buffer, any socket on the machine.
        "udp_rcvbuf_errors": drops1 - drops0,
        "lost_in_router": received - unique,
        "reports_per_router_core_s": round(received / elapsed / router_cores, 1)
        if router_cores
        else None,
        "load_cpu_cores": round(sum(pp["cpu_cores"] for pp in per_proc), 3),
        "broker_cpu_cores": round(cores("broker"), 3),
        "bench_consumer_cpu_cores": round(cores("bench"), 3),
        "machine_busy_cores": round((busy1 - busy0) / elapsed, 3),
        # The first router's threads (by name), user + system cores, over the load's seconds.
        "router0_threads": {
            name: [
                round((u - threads0.get(name, (0, 0))[0]) / elapsed, 3),
                round((sy - threads0.get(name, (0, 0))[1]) / elapsed, 3),
            ]
            for name, (u, sy) in sorted(threads1.items())
            if u + sy - sum(threads0.get(name, (0, 0))) > 0.01 * elapsed
        },
        "per_router": routers_out,
        "per_proc": per_proc,
    }
    RESULTS.mkdir(exist_ok=True)
    name = args.name or (
        f"router-paced-{args.rate:g}"
        if args.rate
        else "router"
        if args.routers == 1
        else f"router-{args.routers}"
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Router ingest ({result['when']}, {result['machine']})",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    md += [
        f"| {k} | {v} |" for k, v in result.items()
        if k not in ("bench", "when", "machine", "per_router", "per_proc", "router0_threads")
    ]  # fmt: skip
    md += [
        "",
        "| router | datagrams in | acked | rejected | cores | reports/s | reports/s per core |",
    ]
    md += ["|---|---|---|---|---|---|---|"]
    md += [
        f"| {i} | {r['datagrams_in']} | {r['acked']} | {r['rejected']} | {r['cpu_cores']} | "
        f"{r['reports_per_s']} | {r['reports_per_core_s']} |"
        for i, r in enumerate(routers_out)
    ]
    md += ["", "| router 0 threads | user cores | system cores |", "|---|---|---|"]
    md += [f"| {name} | {u} | {sy} |" for name, (u, sy) in result["router0_threads"].items()]
    md += ["", "| load process | router | sent | refused | cores |", "|---|---|---|---|---|"]
    md += [
        f"| {i} | {pp['router']} | {pp['sent']} | {pp['refused']} | {pp['cpu_cores']} |"
        for i, pp in enumerate(per_proc)
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
