"""Typed channels' ingest: per type, at rising offered rates, what reaches the type's topic.

Usage::

    .venv/bin/python bench/ingest.py [--rates 100,500,1000,2000,5000] [--seconds 5]
                                     [--types chat,microphone,camera,points]
                                     [--datagrams chat,microphone] [--results-dir bench/results]

Uses the local broker (started if needed, left running if it was) or ``PULSAR_URL``. Starts one
real router (its own ports, a routes file of its own with private topics and rate limits above
the offered rates, so nothing is refused), opens one WebTransport session (the Python client,
hello and the clock pings, no video), and for every type and rate sends messages of the type's
typical size for ``--seconds``, paced every 5 ms, on the type's stream (and, for ``--datagrams``
types, a second run as datagrams). A reader per topic (its own thread, from the start of the
topic) takes every ``ChannelMessage`` and ``ChannelEnd`` and gives, per step:

- offered and achieved rate (what the sender managed to write), messages sent, received once,
  lost (sent, never on the topic), duplicated (on the topic more than once);
- publish latency: ``send_async`` to the broker's confirmation, from the router's channel CSV
  (p50: the median of its per-second p50s; p99: the largest per-second p99);
- router -> consumed (the message's ``t_router_recv_ns`` to the reader's receive time) and
  capture -> consumed (its capture time, converted by the router's clock offset), p50/p99.

Results: ``<results-dir>/ingest.json`` and ``ingest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import platform
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pulsar
import yaml

from carom import channels as ch
from carom import protocol as p
from carom_client.channels import ChannelSender
from carom_client.session import RouterInfo
from carom_client.webtransport import ClientSession, connect
from carom_local import pulsar as local_pulsar
from carom_local.run import Service
from carom_runtime.pulsar_io import quiet_logger

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TICK_S = 0.005

#: Typical message per type: (format, payload bytes, meta). Camera: a 1.2 Mbps 30 fps H.264
#: stream's P-frame (5 KB); microphone: 20 ms of Opus at 64 kbps; points: 1,000 points.
TYPES: dict[str, tuple[ch.Format, int, dict[str, Any]]] = {
    "chat": ("text", 80, {}),
    "microphone": ("audio", 160, {"codec": "opus", "timestamp_us": 0, "sample_rate": 48_000,
                                  "channels": 1}),
    "camera": ("video", 5_000, {"codec": "h264", "key": False, "timestamp_us": 0}),
    "points": ("points", 12_000, {"count": 1_000}),
}  # fmt: skip


@dataclass
class Step:
    type: str
    transport: str
    offered_per_s: float
    seconds: float
    bytes_each: int
    sent: int = 0
    achieved_per_s: float = 0.0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    refused: int = 0
    #: Datagrams the client could not hand to QUIC (its queue full): never left this machine.
    not_sent: int = 0
    #: Cores used over the step (utime + stime): the router process, and this one (the client).
    router_cores: float = 0.0
    client_cores: float = 0.0
    capture_to_router_p50_ms: float | None = None
    capture_to_router_p99_ms: float | None = None
    publish_p50_ms: float | None = None
    publish_p99_ms: float | None = None
    router_to_consumed_p50_ms: float | None = None
    router_to_consumed_p99_ms: float | None = None
    capture_to_consumed_p50_ms: float | None = None
    capture_to_consumed_p99_ms: float | None = None
    notes: list[str] = field(default_factory=list)


class TopicTally(threading.Thread):
    """Reads one topic from its start; counts every seq per session and keeps latencies."""

    def __init__(self, client: pulsar.Client, topic: str) -> None:
        super().__init__(daemon=True)
        self.reader = client.create_reader(topic, pulsar.MessageId.earliest)
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.seen: dict[str, Counter[int]] = {}
        self.router_ms: dict[str, list[float]] = {}
        self.capture_ms: dict[str, list[float]] = {}
        self.to_router_ms: dict[str, list[float]] = {}
        self.ends: dict[str, ch.ChannelEnd] = {}

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                msg = self.reader.read_next(100)
            except pulsar.Timeout:
                continue
            except pulsar.PulsarException:
                self.halt.wait(0.2)
                continue
            now = time.time_ns()
            record = ch.decode_record(msg.data())
            sid = record.session_id
            with self.lock:
                if isinstance(record, ch.ChannelEnd):
                    self.ends[sid] = record
                    continue
                self.seen.setdefault(sid, Counter())[record.seq] += 1
                self.router_ms.setdefault(sid, []).append((now - record.t_router_recv_ns) / 1e6)
                if record.t_capture_ns is not None:
                    self.capture_ms.setdefault(sid, []).append((now - record.t_capture_ns) / 1e6)
                    self.to_router_ms.setdefault(sid, []).append(
                        (record.t_router_recv_ns - record.t_capture_ns) / 1e6
                    )

    def stop(self) -> None:
        self.halt.set()
        self.join(2)
        with contextlib.suppress(Exception):
            self.reader.close()


async def _session(info: RouterInfo, sid: str) -> tuple[ClientSession, asyncio.Task[None]]:
    """A session that says hello and answers pings (the clock offset), and has no video."""
    wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
    stream = wt.open_stream()
    stream.write(p.frame(p.Hello(session_id=sid, client="bench-ingest")))
    welcomed = asyncio.get_running_loop().create_future()

    async def control() -> None:
        reader = p.FrameReader()
        async for chunk in stream:
            for body in reader.feed(chunk):
                msg = p.parse_router(body)
                if isinstance(msg, p.Welcome) and not welcomed.done():
                    welcomed.set_result(True)
                elif isinstance(msg, p.Ping):
                    stream.write(p.frame(p.Pong(id=msg.id, t_client_ms=time.time_ns() / 1e6)))
                elif isinstance(msg, p.Error) and msg.code not in ("rate",):
                    print(f"  router error: {msg.code}: {msg.message}", flush=True)

    task = asyncio.get_running_loop().create_task(control())
    await asyncio.wait_for(welcomed, 10)
    await asyncio.sleep(0.5)  # a few pings: the clock offset the capture times are converted by
    return wt, task


async def _send(sender: ChannelSender, step: Step, datagram: bool) -> None:
    _fmt, size, meta = TYPES[step.type]
    # Chat is text (the router checks it is UTF-8); the rest random bytes of the type's size.
    payload = b"x" * size if step.type == "chat" else os.urandom(size)
    total = int(step.offered_per_s * step.seconds)
    t0 = time.monotonic()
    while step.sent < total:
        due = min(total, int((time.monotonic() - t0) * step.offered_per_s) + 1)
        while step.sent < due:
            m = dict(meta)
            if "timestamp_us" in m:
                m["timestamp_us"] = step.sent * 20_000
            sender.send(step.type, payload, m, datagram=datagram)
            step.sent += 1
        await asyncio.sleep(TICK_S)
    step.achieved_per_s = step.sent / max(1e-9, time.monotonic() - t0)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _router_rows(path: Path, type_: str, t0: float, t1: float) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [
            r for r in csv.DictReader(f)
            if r["type"] == type_ and t0 <= float(r["time"]) <= t1 + 1.5
        ]  # fmt: skip


def _routes(tag: str, datagrams: set[str]) -> dict[str, Any]:
    routes = {}
    for name, (fmt, size, _) in TYPES.items():
        routes[name] = {
            "topic": f"persistent://public/default/bench-ingest-{name}-{tag}",
            "format": fmt, "max_message_bytes": max(65_536, size * 4),
            "max_rate": 100_000, "burst": 100_000, "max_queue": 100_000,
            "on_overflow": "spool", "datagrams": name in datagrams,
        }  # fmt: skip
    return {"version": 1, "routes": routes}


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run_step(
    info: RouterInfo, tally: TopicTally, step: Step, router_csv: Path, datagram: bool,
    router_pid: int,
) -> None:  # fmt: skip
    sid = f"ingest-{step.type}-{step.transport}-{int(step.offered_per_s)}-{uuid.uuid4().hex[:4]}"
    wt, control = await _session(info, sid)
    sender = ChannelSender(wt)
    t0 = time.time()
    cpu0 = (_cpu_s(router_pid), _cpu_s(os.getpid()), time.monotonic())
    await _send(sender, step, datagram)
    step.not_sent = sender.counters["datagrams_not_sent"]
    if not datagram and not await sender.finish(60):
        step.notes.append("streams not all acknowledged within 60 s")
    # Everything sent is on the topic, or given up on after 20 s of nothing new.
    last, still = -1, time.monotonic()
    while time.monotonic() - still < (3 if datagram else 20):
        with tally.lock:
            got = len(tally.seen.get(sid, ()))
        if got >= step.sent:
            break
        if got != last:
            last, still = got, time.monotonic()
        await asyncio.sleep(0.1)
    t1 = time.time()
    wall = time.monotonic() - cpu0[2]
    step.router_cores = round((_cpu_s(router_pid) - cpu0[0]) / wall, 2)
    step.client_cores = round((_cpu_s(os.getpid()) - cpu0[1]) / wall, 2)
    control.cancel()
    with contextlib.suppress(BaseException):
        await control
    with contextlib.suppress(Exception):
        await wt.close()
    with tally.lock:
        seen = tally.seen.get(sid, Counter())
        step.received = len(seen)
        step.duplicates = sum(n - 1 for n in seen.values())
        step.lost = step.sent - step.received
        router_ms = tally.router_ms.get(sid, [])
        capture_ms = tally.capture_ms.get(sid, [])
        to_router_ms = tally.to_router_ms.get(sid, [])
    step.capture_to_router_p50_ms, step.capture_to_router_p99_ms = (
        _pct(to_router_ms, 50), _pct(to_router_ms, 99)
    )  # fmt: skip
    step.router_to_consumed_p50_ms, step.router_to_consumed_p99_ms = (
        _pct(router_ms, 50), _pct(router_ms, 99)
    )  # fmt: skip
    step.capture_to_consumed_p50_ms, step.capture_to_consumed_p99_ms = (
        _pct(capture_ms, 50), _pct(capture_ms, 99)
    )  # fmt: skip
    rows = [r for r in _router_rows(router_csv, step.type, t0, t1) if r["publish_p50_ms"]]
    if rows:
        step.publish_p50_ms = round(float(np.median([float(r["publish_p50_ms"]) for r in rows])), 2)
        step.publish_p99_ms = round(max(float(r["publish_p99_ms"]) for r in rows), 2)
        step.refused = sum(int(r["refused"] or 0) for r in rows)


def _markdown(steps: list[Step], meta: dict[str, Any]) -> str:
    out = [
        "# Typed channels: ingest per type at rising offered rates",
        "",
        f"{meta['when']} on {meta['machine']}; one router, one session, the local Apache Pulsar "
        f"{meta['pulsar']}; `{meta['command']}`. Each step {meta['seconds']:g} s. Publish: the "
        "router's `send_async` to the broker's confirmation (median of per-second p50s / largest "
        "per-second p99). Router -> consumed and capture -> consumed: a reader on the topic.",
        "",
        "| type | bytes | via | offered/s | achieved/s | sent | on topic once | lost | dup | "
        "refused | capture->router p50/p99 ms | publish p50/p99 ms | "
        "router->consumed p50/p99 ms | capture->consumed p50/p99 ms | router / client cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        out.append(
            f"| {s.type} | {s.bytes_each} | {s.transport} | {s.offered_per_s:g} | "
            f"{s.achieved_per_s:.0f} | {s.sent} | {s.received} | {s.lost} | {s.duplicates} | "
            f"{s.refused} | {s.capture_to_router_p50_ms} / {s.capture_to_router_p99_ms} | "
            f"{s.publish_p50_ms} / {s.publish_p99_ms} | "
            f"{s.router_to_consumed_p50_ms} / {s.router_to_consumed_p99_ms} | "
            f"{s.capture_to_consumed_p50_ms} / {s.capture_to_consumed_p99_ms} | "
            f"{s.router_cores} / {s.client_cores} |"
        )
        if s.not_sent:
            s.notes.append(f"{s.not_sent} datagrams never left the client (its QUIC queue full)")
        for note in s.notes:
            out.append(f"|   | note ({s.type} {s.transport} {s.offered_per_s:g}/s): {note} "
                       "||||||||||||| ")  # fmt: skip
    return "\n".join(out) + "\n"


def _free(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _main_async(args: argparse.Namespace, info: RouterInfo, tallies: dict[str, TopicTally],
                      router_csv: Path, router_pid: int) -> list[Step]:  # fmt: skip
    steps: list[Step] = []
    datagrams = set(args.datagrams.split(",")) if args.datagrams else set()
    for type_ in args.types.split(","):
        transports = ["stream", "datagram"] if type_ in datagrams else ["stream"]
        for transport in transports:
            for rate in (float(r) for r in args.rates.split(",")):
                step = Step(type_, transport, rate, args.seconds, TYPES[type_][1])
                await _run_step(
                    info, tallies[type_], step, router_csv, transport == "datagram", router_pid
                )
                steps.append(step)
                print(
                    f"  {type_:10} {transport:8} {rate:6.0f}/s: sent {step.sent}, achieved "
                    f"{step.achieved_per_s:.0f}/s, on topic {step.received}, lost {step.lost}, "
                    f"dup {step.duplicates}, not sent {step.not_sent}, capture->router p50/p99 "
                    f"{step.capture_to_router_p50_ms}/{step.capture_to_router_p99_ms} ms, "
                    f"cores router/client {step.router_cores}/{step.client_cores}, "
                    f"publish p50/p99 {step.publish_p50_ms}/"
                    f"{step.publish_p99_ms} ms, capture->consumed p50/p99 "
                    f"{step.capture_to_consumed_p50_ms}/{step.capture_to_consumed_p99_ms} ms",
                    flush=True,
                )
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,500,1000,2000,5000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--types", default="chat,microphone,camera,points")
    parser.add_argument("--datagrams", default="chat,microphone",
                        help="types also measured as datagrams (small ones)")  # fmt: skip
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    for t in args.types.split(","):
        if t not in TYPES:
            parser.error(f"unknown type {t}; one of {', '.join(TYPES)}")
    broker = local_pulsar.start()
    tag = uuid.uuid4().hex[:8]
    work = Path(f"/tmp/carom-ingest-{tag}")
    work.mkdir(parents=True)
    datagrams = set(args.datagrams.split(",")) if args.datagrams else set()
    routes = _routes(tag, datagrams)
    (work / "routes.yaml").write_text(yaml.safe_dump(routes))
    router_csv = work / "router-channels.csv"
    http, wt_port = _free(), _free(socket.SOCK_DGRAM)
    argv_router = [
        sys.executable, "-m", "carom_router", "--pulsar-url", broker.service_url,
        "--http-port", str(http), "--webtransport-port", str(wt_port),
        "--channels-routes-file", str(work / "routes.yaml"),
        "--channels-metrics-csv", str(router_csv),
        "--simulator-url", "http://127.0.0.1:9",  # no video in this bench
    ]  # fmt: skip
    router = Service("router", argv_router, f"http://127.0.0.1:{http}/routes", work / "router.log")
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    tallies: dict[str, TopicTally] = {}
    try:
        router.wait_healthy(60)
        for name, route in routes["routes"].items():
            tallies[name] = TopicTally(client, route["topic"])
            tallies[name].start()
        info = asyncio.run(RouterInfo.fetch(f"http://127.0.0.1:{http}"))
        steps = asyncio.run(_main_async(args, info, tallies, router_csv, router.proc.pid))
    finally:
        for t in tallies.values():
            t.stop()
        router.stop()
        client.close()
        if broker.started_here:
            local_pulsar.stop(quiet=True)
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"({_cpu_model()})",
        "pulsar": "4.0.7 standalone",
        "command": "bench/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": args.seconds,
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "ingest.json").write_text(
        json.dumps({"meta": meta, "steps": [asdict(s) for s in steps]}, indent=1) + "\n"
    )
    (results / "ingest.md").write_text(_markdown(steps, meta))
    print(f"bench/ingest: results in {results}/ingest.md", flush=True)
    bad = [s for s in steps if s.duplicates or (s.lost and s.transport == "stream")]
    return 1 if bad else 0


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
