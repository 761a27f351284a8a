"""Router ingest: report datagrams -> Pulsar, one router process, and receive -> delivered latency.

Usage: ``.venv/bin/python bench/router_ingest.py [--sessions 4] [--seconds 10] [--rate 0]``
(starts the local broker unless ``PULSAR_URL`` is set). Results: ``bench/results/router.json`` and
``bench/results/router.md``.

The router runs as its own process. Load comes from Python WebTransport clients in this process
(``--sessions`` of them, each sending valid 36-byte reports as fast as QUIC lets it, or at
``--rate`` per session), and a sync consumer thread reads the centroid topic. Everything shares
the machine's cores with the broker, so the figures are for the whole loop on one box.

- ingest rate: reports published and consumed, over the span of the router's receive stamps
  (what one router process took in while the clients, sharing its cores, kept it busy);
- router receive -> published: ``t_published_ns - t_router_recv_ns`` in each message;
- router receive -> consumed: consumer's clock at receipt minus ``t_router_recv_ns``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pulsar

from carom import protocol as p
from carom import schemas
from carom_client.session import RouterInfo
from carom_client.webtransport import connect
from carom_local import pulsar as local_pulsar
from carom_runtime.pulsar_io import quiet_logger

RESULTS = Path(__file__).resolve().parent / "results"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Consumer(threading.Thread):
    def __init__(self, url: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.client = pulsar.Client(url, logger=quiet_logger())
        self.consumer = self.client.subscribe(
            topic, "bench", initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=10000,
        )  # fmt: skip
        self.internal_ms: list[float] = []
        self.recv_ns: list[int] = []
        self.delivered_ms: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                msg = self.consumer.receive(200)
            except pulsar.Timeout:
                continue
            now = time.time_ns()
            c = schemas.decode(msg.data(), schemas.Centroid)
            self.internal_ms.append((c.t_published_ns - c.t_router_recv_ns) / 1e6)
            self.recv_ns.append(c.t_router_recv_ns)
            self.delivered_ms.append((now - c.t_router_recv_ns) / 1e6)
            self.consumer.acknowledge(msg)

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        self.client.close()


async def load(info: RouterInfo, sessions: int, seconds: float, rate: float) -> tuple[int, int]:
    async def one(i: int) -> tuple[int, int]:
        wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
        stream = wt.open_stream()
        stream.write(p.frame(p.Hello(session_id=f"bench-{i}-{uuid.uuid4().hex[:4]}")))
        await asyncio.sleep(0.5)
        sent = refused = 0
        t0 = time.monotonic()
        now_ms = time.time_ns() / 1e6
        while (elapsed := time.monotonic() - t0) < seconds:
            if rate and sent > elapsed * rate:
                await asyncio.sleep(0.001)
                continue
            data = p.encode_report(sent, sent * 1500, (320.5, 240.5), now_ms, now_ms)
            if wt.send_datagram(data):
                sent += 1
                if sent % 64 == 0:
                    await asyncio.sleep(0)
                    now_ms = time.time_ns() / 1e6
            else:
                refused += 1
                await asyncio.sleep(0.0005)
        await asyncio.sleep(0.5)
        await wt.close()
        return sent, refused

    results = await asyncio.gather(*(one(i) for i in range(sessions)))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str, label: str) -> float:
    m = re.search(rf'^{name}\{{[a-z]+="{label}"\}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="per session; 0 = flat out")
    args = parser.parse_args()
    broker = local_pulsar.start()
    topic = f"persistent://public/default/bench-centroids-{uuid.uuid4().hex[:8]}"
    http_port, wt_port = free_port(), free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen(
        [sys.executable, "-m", "carom_router", "--http-port", str(http_port),
         "--webtransport-port", str(wt_port), "--pulsar-url", broker.service_url,
         "--pulsar-topics-centroids", topic, "--limits-max-report-rate", "1000000",
         "--limits-report-burst", "1000000", "--log-level", "warning"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    consumer = Consumer(broker.service_url, topic)
    consumer.start()
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/config", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        info = asyncio.run(RouterInfo.fetch(url))
        m0 = httpx.get(f"{url}/metrics").text
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.monotonic()
        sent, refused = asyncio.run(load(info, args.sessions, args.seconds, args.rate))
        elapsed = time.monotonic() - t0
        cpu1 = cpu_seconds(proc.pid)
        time.sleep(2.0)
        m1 = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
        consumer.close()
        if broker.started_here:
            local_pulsar.stop()
    received = metric(m1, "carom_router_webtransport_total", "datagrams_in") - metric(
        m0, "carom_router_webtransport_total", "datagrams_in"
    )
    acked = metric(m1, "carom_router_reports_published_total", "acked") - metric(
        m0, "carom_router_reports_published_total", "acked"
    )
    span_s = (max(consumer.recv_ns) - min(consumer.recv_ns)) / 1e9 if consumer.recv_ns else 1.0
    internal = np.array(consumer.internal_ms or [np.nan])
    delivered = np.array(consumer.delivered_ms or [np.nan])
    result = {
        "bench": "router_ingest",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sessions": args.sessions,
        "paced_rate_per_session": args.rate or None,
        "seconds": round(elapsed, 2),
        "datagrams_sent": sent,
        "client_refused_congestion": refused,
        "datagrams_received_by_router": int(received),
        "reports_published_acked": int(acked),
        "reports_consumed": len(consumer.delivered_ms),
        # Over the span the router was actually receiving (its own receive stamps).
        "ingest_reports_per_s": round(len(consumer.recv_ns) / span_s, 1),
        "router_cpu_cores": round((cpu1 - cpu0) / elapsed, 3),
        "receive_to_published_ms_p50": round(float(np.percentile(internal, 50)), 3),
        "receive_to_published_ms_p99": round(float(np.percentile(internal, 99)), 3),
        "receive_to_consumed_ms_p50": round(float(np.percentile(delivered, 50)), 3),
        "receive_to_consumed_ms_p99": round(float(np.percentile(delivered, 99)), 3),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "router" if not args.rate else f"router-paced-{args.rate:g}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Router ingest ({result['when']}, {result['machine']})", ""]
    md += [f"| {k} | {v} |" for k, v in result.items() if k not in ("bench", "when", "machine")]
    md.insert(2, "| figure | value |\n|---|---|")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
