"""Tracker throughput and latency: one tracker process against the real broker.

Usage: ``.venv/bin/python bench/tracker_throughput.py [--frames 100000] [--sessions 16]
[--rate 1000] [--seconds 10]`` (starts the local broker unless ``PULSAR_URL`` is set).
Results: ``bench/results/tracker.json`` and ``bench/results/tracker.md``.

- drain: ``--frames`` truth + as many reports (``--sessions`` sessions) are pre-loaded into fresh
  topics with the services' producer settings (key-based batching, keyed by session); then one
  tracker starts and the time from its /health turning 200 to the last row being durable (fsynced
  and acked) gives rows per second.
- paced: a tracker runs while truth + reports are published at ``--rate`` frames/s; each row's
  ``t_computed_ns - t_published_ns`` (report published -> row joined) is read from the CSV.
Everything shares the machine's cores with the broker, so the figures are for the whole loop.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pulsar

from carom import schemas
from carom.config import PulsarSettings
from carom.pulsar_io import make_producer, quiet_logger
from carom_local import pulsar as local_pulsar

RESULTS = Path(__file__).resolve().parent / "results"
DURABLE = 'carom_tracker_rows_total{outcome="durable"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def topics() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        k: f"persistent://public/default/bench-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }


class Feed:
    def __init__(self, url: str, t: dict[str, str]) -> None:
        self.client = pulsar.Client(url, logger=quiet_logger())
        settings = PulsarSettings(url=url, max_pending_messages=50_000)
        self.truth = make_producer(self.client, t["truth"], settings)
        self.reports = make_producer(self.client, t["centroids"], settings)
        self.failed = 0

    def _cb(self, res: pulsar.Result, _mid: object) -> None:
        if res != pulsar.Result.Ok:
            self.failed += 1

    def frame(self, sid: str, f: int) -> None:
        now = time.time_ns()
        t = schemas.Truth(session_id=sid, frame=f, rtp_ts=(f * 1500) % 2**32, x=100.0 + f % 300,
                          y=200.0, t_render_ns=now)  # fmt: skip
        self.truth.send_async(schemas.encode(t), self._cb, partition_key=sid)
        c = schemas.Centroid(
            session_id=sid, rtp_ts=t.rtp_ts, detected=True, x=t.x + 1.0, y=t.y,
            t_browser_recv_ns=now, t_browser_analysed_ns=now, t_router_recv_ns=now,
            t_published_ns=time.time_ns(),
        )  # fmt: skip
        self.reports.send_async(schemas.encode(c), self._cb, partition_key=sid)

    def flush(self) -> None:
        self.truth.flush()
        self.reports.flush()

    def close(self) -> None:
        self.client.close()


class Tracker:
    def __init__(self, url: str, t: dict[str, str], metrics: Path, run: str) -> None:
        self.port = free_port()
        self.log = metrics / f"{run}.log"
        metrics.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "carom_tracker", "--http-port", str(self.port),
             "--pulsar-url", url, "--pulsar-topics-truth", t["truth"],
             "--pulsar-topics-centroids", t["centroids"], "--pulsar-topics-errors", t["errors"],
             "--metrics-dir", str(metrics), "--run", run, "--log-level", "warning"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tracker did not start:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_durable(self, rows: int, timeout: float) -> float:
        """Seconds until ``rows`` rows are durable (polled every 50 ms)."""
        t0 = time.monotonic()
        while (done := self.metric(DURABLE)) < rows:
            if time.monotonic() - t0 > timeout:
                raise SystemExit(
                    f"only {done} of {rows} rows durable after {timeout} s; tracker log:\n"
                    + self.log.read_text()[-3000:]
                )
            time.sleep(0.05)
        return time.monotonic() - t0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def read_rows(folder: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for p in folder.glob("*.csv"):
        with p.open(newline="") as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def drain(url: str, frames: int, sessions: int, work: Path) -> dict[str, object]:
    t = topics()
    # Create the subscription first so pre-loaded messages are retained for it.
    c = pulsar.Client(url, logger=quiet_logger())
    for name in ("truth", "centroids"):
        for sub in ("carom-tracker", "bench-bare"):
            c.subscribe(t[name], sub, consumer_type=pulsar.ConsumerType.KeyShared).close()
    c.close()
    feed = Feed(url, t)
    t0 = time.monotonic()
    for f in range(frames // sessions):
        for s in range(sessions):
            feed.frame(f"s{s:02d}", f)
        if f % 200 == 0:
            feed.flush()
    feed.flush()
    load_s = time.monotonic() - t0
    feed.close()
    n = (frames // sessions) * sessions
    tracker = Tracker(url, t, work, "drain")
    try:
        elapsed = tracker.wait_durable(n, timeout=600)
        missed = tracker.metric('carom_tracker_join_total{counter="missed"}')
    finally:
        tracker.stop()
    rows = read_rows(work / "drain")
    bare = bare_drain(url, t, n)
    return {
        "frames": n,
        "messages": 2 * n,
        "sessions": sessions,
        "preload_s": round(load_s, 2),
        "drain_s": round(elapsed, 2),
        "rows_per_s": round(n / elapsed),
        "messages_per_s": round(2 * n / elapsed),
        "rows_in_csv": len(rows),
        "missed": int(missed),
        "publish_failed": feed.failed,
        "bare_consumer_messages_per_s": bare,
    }


def bare_drain(url: str, t: dict[str, str], n: int) -> int:
    """The ceiling here: a Python consumer that only receives and acks the same backlog."""
    client = pulsar.Client(url, logger=quiet_logger())
    consumers = [
        client.subscribe(
            t[name], "bench-bare", consumer_type=pulsar.ConsumerType.KeyShared,
            receiver_queue_size=5000, batch_index_ack_enabled=True,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(500, 4 * 1024 * 1024, 1),
        )
        for name in ("truth", "centroids")
    ]  # fmt: skip

    def run(c: pulsar.Consumer) -> None:
        got = 0
        while got < n:
            msgs = [c.receive(10_000), *c.batch_receive()]
            for m in msgs:
                c.acknowledge(m)
            got += len(msgs)

    threads = [threading.Thread(target=run, args=(c,)) for c in consumers]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rate = round(2 * n / (time.monotonic() - t0))
    client.close()
    return rate


def _feed_paced(url: str, t: dict[str, str], frames: int, rate: int, sessions: int) -> None:
    """``frames`` frames per session, all sessions together at ``rate`` frames/s."""
    feed = Feed(url, t)
    start = time.monotonic()
    for i in range(frames):
        for s in range(sessions):
            due = start + (i * sessions + s) / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            feed.frame(f"p{rate}-{s:02d}", i)  # ids unique per run, as live
    feed.flush()
    feed.close()


def paced(url: str, rate: int, seconds: float, sessions: int, work: Path) -> dict[str, object]:
    t = topics()
    n = int(rate * seconds) // sessions * sessions
    tracker = Tracker(url, t, work, f"paced-{rate}")
    try:
        _feed_paced(url, t, n // sessions, rate, sessions)
        tracker.wait_durable(n, timeout=120)
    finally:
        tracker.stop()
    rows = read_rows(work / f"paced-{rate}")
    joined = [r for r in rows if r["status"] == "ok"]
    comp = np.array([(int(r["t_computed_ns"]) - int(r["t_published_ns"])) / 1e6 for r in joined])
    cons = np.array([float(r["published_to_tracker_ms"]) for r in joined])
    return {
        "rate_frames_per_s": rate,
        "messages_per_s": 2 * rate,
        "seconds": seconds,
        "sessions": sessions,
        "frames": n,
        "rows_ok": len(joined),
        "published_to_computed_ms": {
            "p50": round(float(np.percentile(comp, 50)), 3),
            "p99": round(float(np.percentile(comp, 99)), 3),
            "max": round(float(comp.max()), 3),
        },
        "published_to_consumed_ms": {
            "p50": round(float(np.percentile(cons, 50)), 3),
            "p99": round(float(np.percentile(cons, 99)), 3),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--rates", default="200,500,1000", help="paced frames/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    broker = local_pulsar.start()
    try:
        with tempfile.TemporaryDirectory(prefix="carom-bench-") as tmp:
            work = Path(tmp)
            d = drain(broker.service_url, args.frames, args.sessions, work)
            print("drain:", json.dumps(d))
            ps = []
            for rate in (int(r) for r in args.rates.split(",")):
                ps.append(paced(broker.service_url, rate, args.seconds, args.sessions, work))
                print("paced:", json.dumps(ps[-1]))
    finally:
        if broker.started_here:
            local_pulsar.stop()
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "drain": d,
        "paced": ps,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracker.json").write_text(json.dumps(result, indent=2) + "\n")
    cpus, py = os.cpu_count(), platform.python_version()
    drain_row = (
        f"| {d['frames']:,} | {d['drain_s']} s | **{d['rows_per_s']:,}** "
        f"| {d['messages_per_s']:,} | {d['missed']} |"
    )
    paced_rows = []
    for p in ps:
        pc, pt = p["published_to_computed_ms"], p["published_to_consumed_ms"]
        assert isinstance(pc, dict) and isinstance(pt, dict)
        paced_rows.append(
            f"| {p['rate_frames_per_s']:,} ({p['messages_per_s']:,} msg/s) | {p['rows_ok']:,} "
            f"| {pc['p50']} | {pc['p99']} | {pt['p50']} | {pt['p99']} |"
        )
    paced_table = "\n".join(paced_rows)
    md = f"""# Tracker throughput and latency

`bench/tracker_throughput.py`: one tracker process (`python -m carom_tracker`, default settings:
Key_Shared durable subscriptions, CSV rows fsynced then acked every 200 ms, error results
published) against the local Apache Pulsar broker, everything on the same machine ({cpus} CPUs,
Python {py}; the broker, the load generator and the tracker share those cores).

## Drain (pre-loaded topics)

{d["frames"]:,} truth + {d["frames"]:,} reports over {d["sessions"]} sessions, pre-loaded with the
services' producer settings ({d["preload_s"]} s to pre-load); time from the tracker's /health 200
to the last row durable (fsynced and acked).

| rows (frames) | drain time | rows/s | messages/s | missed |
|---|---|---|---|---|
{drain_row}

For scale: a Python consumer that only receives and acknowledges the same backlog right after
(no decoding, join, CSV or error results; the entries then in the broker's cache) does
{d["bare_consumer_messages_per_s"]:,} messages/s. The tracker is bound by its own Python work
(one core, the GIL), not by Pulsar. **The goal of 50,000 reports/s (100,000 messages/s) in one
process is not reached**; replicas sharing the subscription split the sessions to go further.

## Paced ({args.sessions} sessions, {args.seconds} s per rate)

Latency from the report's publish stamp (`t_published_ns`) to the join (`t_computed_ns`), read
from the CSV, and to the tracker's receipt of the message (`published_to_tracker_ms`), in ms:

| frames/s | rows | published->computed p50 | p99 | published->consumed p50 | p99 |
|---|---|---|---|---|---|
{paced_table}
"""
    (RESULTS / "tracker.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
