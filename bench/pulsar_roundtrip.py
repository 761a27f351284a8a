"""Publish -> consume latency and throughput through the real broker, with the services' producer.

Usage: ``.venv/bin/python bench/pulsar_roundtrip.py [--messages N] [--rate R] [--cluster]``
(starts the local broker unless ``PULSAR_URL`` is set). Results: ``bench/results/pulsar.json``
and ``bench/results/pulsar.md``; with ``--cluster``, through ``local/pulsar cluster`` (3
bookies, 2 brokers, every entry written to 2 bookies): ``pulsar-cluster.{json,md}``.

Payloads are real encoded ``Truth`` messages (~130 B) keyed over 8 sessions. Latency runs are
paced (a steady stream as the services produce it); throughput runs publish as fast as the
bounded ``Publisher`` lets them while a sync consumer thread receives, acknowledging every message.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pulsar

from carom import schemas
from carom_local import cluster
from carom_local import pulsar as local_pulsar
from carom_runtime.config import PulsarSettings
from carom_runtime.pulsar_io import Publisher, make_client, make_producer

RESULTS = Path(__file__).resolve().parent / "results"


def _payload(i: int, now_ns: int) -> tuple[bytes, str]:
    key = f"bench-{i % 8}"
    msg = schemas.Truth(
        session_id=key, frame=i, rtp_ts=(i * 1500) % 2**32, x=320.5, y=240.25, t_render_ns=now_ns
    )
    return schemas.encode(msg), key


class Receiver(threading.Thread):
    """A sync consumer on a thread of its own (the fast path measured for the tracker)."""

    def __init__(self, client: pulsar.Client, topic: str, expected: int) -> None:
        super().__init__(daemon=True)
        self.consumer = client.subscribe(
            topic,
            "bench",
            consumer_type=pulsar.ConsumerType.KeyShared,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=5000,
        )
        self.expected = expected
        self.latencies_ns: list[int] = []
        self.first_ns = 0
        self.last_ns = 0

    def run(self) -> None:
        while len(self.latencies_ns) < self.expected:
            try:
                msg = self.consumer.receive(5000)
            except pulsar.Timeout:
                break
            now = time.time_ns()
            sent = schemas.decode(msg.data(), schemas.Truth).t_render_ns
            self.latencies_ns.append(now - sent)
            self.first_ns = self.first_ns or now
            self.last_ns = now
            self.consumer.acknowledge(msg)


def run_case(
    broker_url: str, batching: str, messages: int, rate: float | None, delay_ms: int = 1
) -> dict[str, Any]:
    settings = PulsarSettings(
        url=broker_url,
        batching=batching != "none",
        batching_type="default" if batching == "default" else "key_based",
        batching_max_delay_ms=delay_ms,
    )
    client = make_client(settings)
    topic = f"persistent://public/default/bench-{uuid.uuid4().hex[:10]}"
    try:
        receiver = Receiver(client, topic, messages)
        publisher = Publisher(
            make_producer(client, topic, settings), max_in_flight=settings.max_pending_messages
        )
        receiver.start()
        t0 = time.perf_counter()
        start_ns = time.time_ns()
        refused = 0
        for i in range(messages):
            if rate:
                target = t0 + i / rate
                while (delay := target - time.perf_counter()) > 0:
                    time.sleep(min(delay, 0.002))
            data, key = _payload(i, time.time_ns())
            while not publisher.publish(data, key):
                refused += 1
                time.sleep(0.0005)  # back-pressure: wait for the broker to confirm some
        publisher.drain(timeout=60)
        receiver.join(timeout=120)
        lat = np.array(receiver.latencies_ns, dtype=np.float64) / 1e6
        duration_s = (receiver.last_ns - start_ns) / 1e9 if receiver.last_ns else float("nan")
        return {
            "batching": batching,
            "batching_max_delay_ms": settings.batching_max_delay_ms if settings.batching else None,
            "paced_rate_msg_s": rate,
            "messages": messages,
            "received": len(receiver.latencies_ns),
            "failed": publisher.failed,
            "refused_then_retried": refused,
            "throughput_msg_s": round(len(receiver.latencies_ns) / duration_s, 1),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 3),
            "latency_ms_max": round(float(lat.max()), 3),
        }
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="throughput run size")
    parser.add_argument("--paced", type=int, default=5_000, help="latency run size")
    parser.add_argument("--rate", type=float, default=1_000.0, help="latency run rate, msg/s")
    parser.add_argument("--cluster", action="store_true", help="through local/pulsar cluster")
    args = parser.parse_args()
    broker: local_pulsar.Broker | cluster.Cluster = (
        cluster.start() if args.cluster else local_pulsar.start()
    )
    name = "pulsar-cluster" if args.cluster else "pulsar"
    where = (
        f"a cluster of 1 ZooKeeper, 3 bookies and 2 brokers (local/pulsar cluster; ensemble 3, "
        f"write and ack quorum 2), {broker.service_url}"
        if args.cluster
        else "standalone (local/pulsar)"
    )
    try:
        run_case(broker.service_url, "default", 5_000, None)  # warm the broker's JIT up
        cases = []
        for batching in ("key_based", "default", "none"):
            cases.append(run_case(broker.service_url, batching, args.paced, args.rate))
            cases.append(run_case(broker.service_url, batching, args.messages, None))
    finally:
        if broker.started_here:
            cluster.stop() if args.cluster else local_pulsar.stop()
    result = {
        "bench": "pulsar_roundtrip",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pulsar_version": local_pulsar.PULSAR_VERSION,
        "broker": where,
        "pulsar_client": pulsar.__version__,
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
        "cases": cases,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        "| producer | load | received | throughput msg/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        prod = "no batching"
        if c["batching"] != "none":
            prod = f"batching {c['batching_max_delay_ms']} ms, {c['batching']}"
        load = f"paced {c['paced_rate_msg_s']:.0f}/s" if c["paced_rate_msg_s"] else "flat out"
        rows.append(
            f"| {prod} | {load} | {c['received']}/{c['messages']} | {c['throughput_msg_s']} "
            f"| {c['latency_ms_p50']} | {c['latency_ms_p99']} | {c['latency_ms_max']} |"
        )
    md = (
        f"# Pulsar publish -> consume ({result['when']})\n\n"
        f"Apache Pulsar {local_pulsar.PULSAR_VERSION} {where}, pulsar-client "
        f"{pulsar.__version__}, ~130 B Truth messages over 8 keys (sessions), one Key_Shared "
        "consumer thread.\n'paced': a steady stream, latency = publish call -> received by the "
        "consumer. 'flat out': as fast as the producer's bounded in-flight window (10,000) "
        "allows; latency then includes the queueing that causes.\n\n" + "\n".join(rows) + "\n"
    )
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
