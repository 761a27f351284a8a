"""Tracker throughput and latency: one tracker process against the real broker.

Usage: ``.venv/bin/python bench/tracker_throughput.py [--frames 100000] [--sessions 16]
[--rates 200,500,1000] [--seconds 10] [--hop] [--together]`` (starts the local broker unless
``PULSAR_URL`` is set). Results: ``bench/results/tracker.json`` and ``bench/results/tracker.md``.

- drain: ``--frames`` truth + as many reports (``--sessions`` sessions) are pre-loaded into fresh
  topics with the services' producer settings (keyed by session, published flat out); then one
  tracker starts and the time from its /health turning 200 to the last row being durable (fsynced
  and acked) gives rows per second.
- paced: a tracker runs while truth + reports are published at ``--rates`` frames/s; each row's
  ``t_computed_ns - t_published_ns`` (report published -> row joined) is read from the CSV.
- ``--hop``: the Pulsar hop only, per rate (default 60,200,500,1000,2000) in one run on one
  broker: the bare floor (plain producers and consumer, Exclusive and Key_Shared, scratch topics)
  then Carom's path (paced, above). Results: ``bench/results/pulsar-hop.json`` and ``.md``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import numpy as np
import pulsar

from carom import schemas
from carom_local import pulsar as local_pulsar
from carom_local.pulsar import Broker
from carom_local.run import delete_topics
from carom_router.config import RouterSettings
from carom_runtime.config import PulsarSettings, load
from carom_runtime.pulsar_io import make_producer, quiet_logger
from carom_simulator.config import SimulatorSettings
from carom_tracker.config import TrackerSettings

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


#: A checkout's folders that hold the tracker's code and what it imports (``Tracker(tree=)``):
#: on ``PYTHONPATH`` they come before this checkout's editable install.
TREE_DIRS = (".", "runtime", "tracker-service")


def service_producers(url: str) -> tuple[PulsarSettings, PulsarSettings]:
    """The simulator's (truth) and the router's (reports) producer settings, loaded as the
    services load them (defaults, ``CAROM_SIMULATOR_CONFIG``/``CAROM_ROUTER_CONFIG``, env), on
    this broker and with room for a pre-loaded backlog."""
    truth = load(SimulatorSettings, "simulator").pulsar
    reports = load(RouterSettings, "router").pulsar
    return (
        msgspec.structs.replace(truth, url=url, max_pending_messages=50_000),
        msgspec.structs.replace(reports, url=url, max_pending_messages=50_000),
    )


class Feed:
    """Truth + report per frame, published as the simulator and the router publish them.

    ``plain``: producers with no batching instead (the bare send->receive reference).
    """

    def __init__(
        self, url: str, t: dict[str, str], plain: bool = False, batching: bool | None = None
    ) -> None:
        self.client = pulsar.Client(url, logger=quiet_logger())
        truth, reports = service_producers(url)
        if plain:
            truth = reports = PulsarSettings(url=url, batching=False, max_pending_messages=50_000)
        if batching is not None:  # the services' producers, batching switched on or off
            truth = msgspec.structs.replace(truth, batching=batching)
            reports = msgspec.structs.replace(reports, batching=batching)
        self.settings = {"truth": truth, "reports": reports}
        self.truth = make_producer(self.client, t["truth"], truth)
        self.reports = make_producer(self.client, t["centroids"], reports)
        self.failed = 0

    def _cb(self, res: pulsar.Result, _mid: object) -> None:
        if res != pulsar.Result.Ok:
            self.failed += 1

    def frame(self, sid: str, f: int) -> None:
        self.truth_of(sid, f)
        self.report_of(sid, f)

    def truth_of(self, sid: str, f: int) -> None:
        t = schemas.Truth(session_id=sid, frame=f, rtp_ts=(f * 1500) % 2**32, x=100.0 + f % 300,
                          y=200.0, t_render_ns=time.time_ns())  # fmt: skip
        self.truth.send_async(schemas.encode(t), self._cb, partition_key=sid)

    def report_of(self, sid: str, f: int) -> None:
        now = time.time_ns()
        c = schemas.Centroid(
            session_id=sid, rtp_ts=(f * 1500) % 2**32, detected=True, x=101.0 + f % 300, y=200.0,
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
    """A tracker process; ``tree``: the checkout whose code it runs (default: this one)."""

    def __init__(
        self,
        url: str,
        t: dict[str, str],
        metrics: Path,
        run: str,
        subscription: str = "carom-tracker",
        tree: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.log = metrics / f"{run}.log"
        metrics.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in TREE_DIRS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "carom_tracker", "--http-port", str(self.port),
             "--pulsar-url", url, "--pulsar-topics-truth", t["truth"],
             "--pulsar-topics-centroids", t["centroids"], "--pulsar-topics-errors", t["errors"],
             "--metrics-dir", str(metrics), "--run", run, "--log-level", "warning",
             "--subscription", subscription],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env,
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
    subscribe(url, t, ("carom-tracker", "bench-bare"))
    n, load_s = preload(url, t, frames, sessions)
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
        "publish_failed": 0,  # preload stops the bench on any
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


def subscribe(url: str, t: dict[str, str], subscriptions: tuple[str, ...]) -> None:
    """Create the subscriptions first, so that a pre-loaded backlog is kept for each."""
    c = pulsar.Client(url, logger=quiet_logger())
    for name in ("truth", "centroids"):
        for sub in subscriptions:
            c.subscribe(t[name], sub, consumer_type=pulsar.ConsumerType.KeyShared).close()
    c.close()


def preload(
    url: str, t: dict[str, str], frames: int, sessions: int, batching: bool | None = None
) -> tuple[int, float]:
    """``frames`` truth + as many reports over ``sessions`` sessions, published flat out
    (keyed by session) into topics whose subscriptions exist; (frames, seconds taken)."""
    feed = Feed(url, t, batching=batching)
    t0 = time.monotonic()
    for f in range(frames // sessions):
        for s in range(sessions):
            feed.frame(f"s{s:02d}", f)
        if f % 200 == 0:
            feed.flush()
    feed.flush()
    feed.close()
    if feed.failed:
        raise SystemExit(f"{feed.failed} messages failed to publish")
    return (frames // sessions) * sessions, time.monotonic() - t0


def warm_up(broker: Broker, work: Path, frames: int = 20_000) -> None:
    """One small drain, not reported: a broker just started is slower (its JIT, its caches)."""
    t = topics()
    subscribe(broker.service_url, t, ("carom-tracker",))
    n, _ = preload(broker.service_url, t, frames, 16)
    tracker = Tracker(broker.service_url, t, work / "warm-up", "warm-up")
    try:
        tracker.wait_durable(n, timeout=300)
    finally:
        tracker.stop()
    delete_topics(broker.admin_url, t)


def versus(
    broker: Broker, before: Path, frames: int, sessions: int, rounds: int, work: Path
) -> list[dict[str, Any]]:
    """Drain rates of the tracker in ``before`` (another checkout) and in this one, on the same
    backlog, beside a bare consumer's; per round and producer batching (off: the services'
    default, one entry per message; on: key-based batches). The three read one backlog through
    subscriptions of their own, in an order that turns each round, so that neither tracker is
    always the one reading entries the broker has just cached."""
    url = broker.service_url
    points = []
    for r in range(rounds):
        for batching in (False, True):
            t = topics()
            subscribe(url, t, ("before", "after", "bench-bare"))
            n, load_s = preload(url, t, frames, sessions, batching)
            point: dict[str, Any] = {"round": r, "batching": batching, "frames": n,
                                     "preload_s": round(load_s, 2)}  # fmt: skip
            order = ["before", "after"] if (r + batching) % 2 == 0 else ["after", "before"]
            for who in order:
                run = f"{r}-{'batched' if batching else 'plain'}"
                # A metrics folder each: a tracker continues a session's CSV found in another
                # run's folder of the same parent (the sink's adopt window), and every point
                # has the same session ids.
                metrics = work / f"{who}-{run}"
                tracker = Tracker(url, t, metrics, run, subscription=who,
                                  tree=before if who == "before" else None)  # fmt: skip
                try:
                    elapsed = tracker.wait_durable(n, timeout=600)
                    missed = tracker.metric('carom_tracker_join_total{counter="missed"}')
                finally:
                    tracker.stop()
                rows = read_rows(metrics / run)
                point[who] = {"drain_s": round(elapsed, 2), "rows_per_s": round(n / elapsed),
                              "rows_in_csv": len(rows), "missed": int(missed)}  # fmt: skip
            point["bare_messages_per_s"] = bare_drain(url, t, n)
            point["ratio"] = round(point["after"]["rows_per_s"] / point["before"]["rows_per_s"], 2)
            print("versus:", json.dumps(point), flush=True)
            points.append(point)
            delete_topics(broker.admin_url, t)
    return points


#: Paced runs publish each frame's truth one tick of its session ahead of its report
#: (``sessions / rate`` s: 267 ms at 60 frames/s, 8 ms at 2,000), as live, where the simulator
#: publishes the truth when it renders the frame, before the browser has even received it. So
#: the report is what completes the pair, and the hop measured is the report's. False: both at
#: once (then the row waits for the later of two messages).
TRUTH_AHEAD = True


def _feed_paced(
    url: str, t: dict[str, str], frames: int, rate: int, sessions: int, plain: bool = False
) -> None:
    """``frames`` frames per session, all sessions together at ``rate`` frames/s."""
    feed = Feed(url, t, plain)
    ids = [f"p{rate}-{s:02d}" for s in range(sessions)]  # unique per run, as live
    if TRUTH_AHEAD:
        for sid in ids:
            feed.truth_of(sid, 0)
    start = time.monotonic()
    for i in range(frames):
        for s, sid in enumerate(ids):
            due = start + (i * sessions + s) / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not TRUTH_AHEAD:
                feed.frame(sid, i)
                continue
            feed.report_of(sid, i)
            if i + 1 < frames:
                feed.truth_of(sid, i + 1)
    feed.flush()
    feed.close()


def _stats(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "max": round(float(ms.max()), 3),
    }


class BareReceiver(threading.Thread):
    """A plain consumer (default settings: Exclusive) on a thread: receive, stamp, ack."""

    def __init__(
        self,
        client: pulsar.Client,
        topic: str,
        kind: type[schemas.Centroid],
        key_shared: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        kinds = {"consumer_type": pulsar.ConsumerType.KeyShared} if key_shared else {}
        self.consumer = client.subscribe(topic, "bench-plain", **kinds)
        self.kind = kind
        self.stamps: list[tuple[int, bytes]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                m = self.consumer.receive(100)
            except pulsar.Timeout:
                continue
            self.stamps.append((time.time_ns(), m.data()))
            self.consumer.acknowledge(m)

    def latencies_ms(self) -> np.ndarray:
        sent = [schemas.decode(d, self.kind).t_published_ns for _, d in self.stamps]
        return np.array([(r - p) / 1e6 for (r, _), p in zip(self.stamps, sent, strict=True)])


def bare_paced(
    url: str, rate: int, seconds: float, sessions: int, key_shared: bool = False
) -> dict[str, object]:
    """The floor: the same frames (truth + report) at the same rate through plain producers
    (no batching) and plain consumers on scratch topics; report send -> receive.

    ``key_shared``: the report consumer subscribes Key_Shared (what the tracker needs for
    replicas), otherwise Exclusive (the client's default)."""
    t = topics()
    n = int(rate * seconds) // sessions * sessions
    client = pulsar.Client(url, logger=quiet_logger())
    truth = client.subscribe(t["truth"], "bench-plain")  # keeps the truth load on the broker
    rx = BareReceiver(client, t["centroids"], schemas.Centroid, key_shared)
    rx.start()
    drop = threading.Thread(target=_ack_all, args=(truth, rx.stop), daemon=True)
    drop.start()
    try:
        _feed_paced(url, t, n // sessions, rate, sessions, plain=True)
        deadline = time.monotonic() + 30
        while len(rx.stamps) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        rx.stop.set()
        rx.join(5)
        drop.join(5)
        client.close()
    lat = rx.latencies_ms()
    return {"rate_frames_per_s": rate, "frames": n, "received": len(lat), **_stats(lat)}


def _ack_all(consumer: pulsar.Consumer, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            consumer.acknowledge(consumer.receive(100))
        except pulsar.Timeout:
            continue


def _live(stamps: list[tuple[int, bytes]]) -> list[tuple[int, schemas.FrameResult]]:
    """Each live result received, with when (a ``FrameResults`` gives each of its results)."""
    return [
        (got, e)
        for got, data in list(stamps)
        for e in schemas.results_in(schemas.decode_errors_topic(data))
    ]


def paced(url: str, rate: int, seconds: float, sessions: int, work: Path) -> dict[str, object]:
    t = topics()
    n = int(rate * seconds) // sessions * sessions
    # The live results as a router sees them: a plain consumer of the errors topic.
    client = pulsar.Client(url, logger=quiet_logger())
    results = BareReceiver(client, t["errors"], schemas.Centroid)
    results.start()
    tracker = Tracker(url, t, work, f"paced-{rate}")
    try:
        _feed_paced(url, t, n // sessions, rate, sessions)
        tracker.wait_durable(n, timeout=120)
        deadline = time.monotonic() + 10
        while len(_live(results.stamps)) < n and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        tracker.stop()
        results.stop.set()
        results.join(5)
        client.close()
    live = _live(results.stamps)
    # Computed -> result received: the row's fsync (results go out once durable) + the hop.
    to_live = np.array([(got - e.t_computed_ns) / 1e6 for got, e in live])
    pub_to_live = np.array(
        [(got - e.t_published_ns) / 1e6 for got, e in live if e.t_published_ns is not None]
    )
    rows = read_rows(work / f"paced-{rate}")
    joined = [r for r in rows if r["status"] == "ok"]
    comp = np.array([(int(r["t_computed_ns"]) - int(r["t_published_ns"])) / 1e6 for r in joined])
    cons = np.array([float(r["published_to_tracker_ms"]) for r in joined])
    join = np.array([float(r["tracker_to_computed_ms"]) for r in joined])
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
        "consumed_to_computed_ms": _stats(join),
        "live_results": len(live),
        "computed_to_result_received_ms": _stats(to_live) if len(to_live) else None,
        "published_to_result_received_ms": _stats(pub_to_live) if len(pub_to_live) else None,
    }


def hop(
    url: str, rates: list[int], seconds: float, sessions: int, work: Path
) -> list[dict[str, Any]]:
    """Per rate, the bare floor then Carom's path, one after the other on the same broker."""
    bare_paced(url, 500, 3.0, sessions)  # warm the broker's JIT and caches up, not reported
    out = []
    for rate in rates:
        b = bare_paced(url, rate, seconds, sessions)
        print("bare:", json.dumps(b), flush=True)
        k = bare_paced(url, rate, seconds, sessions, key_shared=True)
        print("bare Key_Shared:", json.dumps(k), flush=True)
        c = paced(url, rate, seconds, sessions, work)
        print("carom:", json.dumps(c), flush=True)
        comp: Any = c["published_to_computed_ms"]
        ratio = {q: round(comp[q] / float(cast(float, b[q])), 2) for q in ("p50", "p99")}
        out.append(
            {"rate_frames_per_s": rate, "bare": b, "bare_key_shared": k, "carom": c, "ratio": ratio}
        )
    return out


def hop_main(rates: list[int], seconds: float, sessions: int) -> None:
    broker = local_pulsar.start()
    try:
        with tempfile.TemporaryDirectory(prefix="carom-bench-") as tmp:
            points = hop(broker.service_url, rates, seconds, sessions, Path(tmp))
    finally:
        if broker.started_here:
            local_pulsar.stop()
    truth, reports = service_producers(broker.service_url)
    tracker = TrackerSettings()
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "pulsar_client": pulsar.__version__},
        "settings": {
            "router_producer": _producer_desc(reports),
            "simulator_producer": _producer_desc(truth),
            "tracker_flush_interval_ms": tracker.flush_interval_ms,
            "truth_ahead": TRUTH_AHEAD,
            "env": {k: v for k, v in os.environ.items() if k.startswith("CAROM_")},
        },
        "points": points,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pulsar-hop.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for pt in points:
        b, k, c, r = pt["bare"], pt["bare_key_shared"], pt["carom"], pt["ratio"]
        pc, cs, cj = (
            c["published_to_computed_ms"],
            c["published_to_consumed_ms"],
            c["consumed_to_computed_ms"],
        )
        rows.append(
            f"| {pt['rate_frames_per_s']:,} | {b['p50']} | {b['p99']} | {k['p50']} | {k['p99']} "
            f"| **{pc['p50']}** "
            f"| **{pc['p99']}** | {r['p50']} | {r['p99']} | {cs['p50']} | {cs['p99']} "
            f"| {cj['p50']} | {cj['p99']} |"
        )
    table = "\n".join(rows)
    md = f"""# Pulsar hop: report published -> tracker computed, beside a bare send -> receive

`bench/tracker_throughput.py --hop` ({result["when"]}): one run, one local Apache Pulsar broker
(`local/pulsar`), {os.cpu_count()} CPUs shared by the broker, the load generator and the
consumer; {sessions} sessions, {seconds} s per point. {_schedule()}

- **bare**: the same frames at the same rate through plain producers (no batching) and a plain
  consumer (default settings: Exclusive) on scratch topics; report send -> receive. **bare
  Key_Shared**: the same with the consumer on a Key_Shared subscription, as the tracker's must
  be for replicas. The ratio is Carom over bare.
- **Carom**: truth published with the simulator's producer settings, the report with the
  router's (`{_producer_desc(reports)}`), into a real tracker process
  (`python -m carom_tracker`, default settings); the report's publish stamp -> the row joined
  (`t_computed_ns`, before the row is fsynced and acked), read from the CSV. Split into
  published -> consumed (`t_tracker_consumed_ns`, the later of truth and report) and
  consumed -> computed (the hand-off to the join thread and the join).

Goal (issue 13): Carom p50 <= 2 ms and p99 <= 8 ms at 60-2,000 frames/s. All figures in ms.

{HOP_HEADER}
{table}
"""
    (RESULTS / "pulsar-hop.md").write_text(md)
    print(md)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scale_out(
    broker: Broker, frames: int, sessions: int, rounds: int, work: Path
) -> list[dict[str, Any]]:
    """Drain rates of 1 and 2 tracker replicas sharing the subscription (Key_Shared splits the
    sessions), with the CPU each process and the broker spent, producers batching off and on."""
    url = broker.service_url
    broker_pid = local_pulsar._pid()
    warm_up(broker, work)
    points = []
    for r in range(rounds):
        for batching in (False, True):
            for replicas in (1, 2) if r % 2 == 0 else (2, 1):
                t = topics()
                subscribe(url, t, ("carom-tracker",))
                n, _ = preload(url, t, frames, sessions, batching)
                name = f"{r}-{replicas}-{'batched' if batching else 'plain'}"
                trackers = [Tracker(url, t, work / f"{name}-{i}", name) for i in range(replicas)]
                try:
                    pids = [tr.proc.pid for tr in trackers]
                    cpu0 = [cpu_seconds(p) for p in pids]
                    b0, t0 = cpu_seconds(broker_pid) if broker_pid else 0.0, time.monotonic()
                    while (done := sum(tr.metric(DURABLE) for tr in trackers)) < n:
                        if time.monotonic() - t0 > 600:
                            raise SystemExit(f"only {done} of {n} rows durable after 600 s")
                        time.sleep(0.05)
                    elapsed = time.monotonic() - t0
                    spent = zip(pids, cpu0, strict=True)
                    cpu = [round((cpu_seconds(p) - c0) / elapsed, 2) for p, c0 in spent]
                    b_cores = (cpu_seconds(broker_pid) - b0) / elapsed if broker_pid else None
                    b_cores = None if b_cores is None else round(b_cores, 2)
                    rows = [int(tr.metric(DURABLE)) for tr in trackers]
                finally:
                    for tr in trackers:
                        tr.stop()
                csv_rows = sum(len(read_rows(work / f"{name}-{i}" / name)) for i in range(replicas))
                point = {"round": r, "batching": batching, "replicas": replicas, "frames": n,
                         "drain_s": round(elapsed, 2), "rows_per_s": round(n / elapsed),
                         "rows_each": rows, "rows_in_csv": csv_rows, "tracker_cores": cpu,
                         "broker_cores": b_cores}  # fmt: skip
                print("scale:", json.dumps(point), flush=True)
                points.append(point)
                delete_topics(broker.admin_url, t)
    return points


def _on_broker(run: Callable[[Broker, Path], list[dict[str, Any]]]) -> dict[str, Any]:
    """``run`` on the local broker (started if need be) in a scratch folder: the result's head
    (when, machine) and its ``points``."""
    broker = local_pulsar.start()
    try:
        with tempfile.TemporaryDirectory(prefix="carom-bench-") as tmp:
            points = run(broker, Path(tmp))
    finally:
        if broker.started_here:
            local_pulsar.stop()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "pulsar_client": pulsar.__version__},
        "points": points,
    }  # fmt: skip


def scale_main(frames: int, sessions: int, rounds: int) -> None:
    result = _on_broker(lambda b, work: scale_out(b, frames, sessions, rounds, work))
    points = result["points"]
    here = Path(__file__).resolve().parent.parent
    result |= {"code": _commit(here), "frames": frames, "sessions": sessions}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracker-scale.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for p in points:
        cores = " + ".join(str(c) for c in p["tracker_cores"])
        rows.append(
            f"| {p['round'] + 1} | {'on' if p['batching'] else 'off'} | {p['replicas']} "
            f"| **{p['rows_per_s']:,}** | {' / '.join(f'{x:,}' for x in p['rows_each'])} "
            f"| {cores} | {p['broker_cores']} | {p['rows_in_csv']:,} |"
        )
    summary = []
    for batching in (False, True):
        for replicas in (1, 2):
            mine = [p for p in points if p["batching"] == batching and p["replicas"] == replicas]
            med = float(np.median([p["rows_per_s"] for p in mine]))
            tc = float(np.median([sum(p["tracker_cores"]) for p in mine]))
            bc = float(np.median([p["broker_cores"] or 0 for p in mine]))
            summary.append(f"| {'on' if batching else 'off'} | {replicas} | **{med:,.0f}** "
                           f"| {tc:.2f} | {bc:.2f} | {tc + bc:.2f} |")  # fmt: skip
    md = f"""# Tracker scale-out: 1 and 2 replicas draining one backlog

`bench/tracker_throughput.py --scale` ({result["when"]}, {os.cpu_count()} CPUs, one local Apache
Pulsar broker on the same cores; code: {result["code"]}). Per round, producer setting and replica
count, {frames:,} frames (truth + report) over {sessions} sessions are pre-loaded, then drained
by 1 or 2 tracker processes sharing the Key_Shared subscription (each takes the sessions whose
keys hash to it). rows/s: from the trackers' start to their last row durable, all together.
Cores: CPU seconds over the drain (`/proc`), per tracker process and for the broker.

## Medians

| batching | trackers | rows/s | tracker cores | broker cores | total of 2 |
|---|---|---|---|---|---|
{chr(10).join(summary)}

## Every run

| round | batching | trackers | rows/s | rows each | tracker cores | broker cores | CSV rows |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    (RESULTS / "tracker-scale.md").write_text(md)
    print(md)


def _commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked=no"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return out.stdout.strip()[:72] + (" + uncommitted changes" if dirty else "")


def versus_main(before: Path, frames: int, sessions: int, rounds: int) -> None:
    result = _on_broker(lambda b, work: versus(b, before, frames, sessions, rounds, work))
    points = result["points"]
    here = Path(__file__).resolve().parent.parent
    result |= {"before": _commit(before), "after": _commit(here), "frames": frames,
               "sessions": sessions}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracker-versus.json").write_text(json.dumps(result, indent=2) + "\n")
    rows, summary = [], []
    for p in points:
        b, a = p["before"], p["after"]
        rows.append(
            f"| {p['round'] + 1} | {'on' if p['batching'] else 'off'} "
            f"| {p['bare_messages_per_s']:,} "
            f"| {b['rows_per_s']:,} | **{a['rows_per_s']:,}** | {p['ratio']} "
            f"| {b['rows_in_csv']:,} / {a['rows_in_csv']:,} | {b['missed']} / {a['missed']} |"
        )
    for batching in (False, True):
        mine = [p for p in points if p["batching"] == batching]
        med = {k: float(np.median([p[k]["rows_per_s"] for p in mine])) for k in ("before", "after")}
        bare = float(np.median([p["bare_messages_per_s"] for p in mine]))
        summary.append(
            f"| {'on' if batching else 'off'} | {bare:,.0f} | {med['before']:,.0f} "
            f"| **{med['after']:,.0f}** | {med['after'] / med['before']:.2f} |"
        )
    md = f"""# Tracker drain: before and after, same machine, same run

`bench/tracker_throughput.py --versus CHECKOUT` ({result["when"]}, {os.cpu_count()} CPUs,
Python {platform.python_version()}, pulsar-client {pulsar.__version__}; one local Apache Pulsar
broker on the same cores). Per round and producer setting, {frames:,} truth + {frames:,} reports
over {sessions} sessions are pre-loaded, then read through subscriptions of their own by the
tracker of each checkout (one process each, default settings: rows fsynced, then acked, live
results published) and by a bare consumer (two threads that only receive and acknowledge). The
trackers' order turns each round. rows/s: from the tracker's /health 200 to its last row
durable.

- **before**: {result["before"]}
- **after**: {result["after"]}
- **batching off**: the services' default producers (one broker entry per message, chosen for
  live latency: `carom_runtime.config.PulsarSettings.batching`); **on**: the same producers with
  key-based batching, 0 ms delay.

## Medians

| batching | bare consumer msg/s | before rows/s | after rows/s | after / before |
|---|---|---|---|---|
{chr(10).join(summary)}

## Every round

| round | batching | bare msg/s | before rows/s | after rows/s | ratio | CSV rows b/a | missed b/a |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    (RESULTS / "tracker-versus.md").write_text(md)
    print(md)


def _schedule() -> str:
    if TRUTH_AHEAD:
        return (
            "Each frame's truth is published one tick of its session ahead of its report "
            "(`sessions / rate` s), as live, where the truth is published at render time."
        )
    return "Each frame's truth and report are published together (`--together`)."


HOP_HEADER = (
    "| frames/s | bare p50 | bare p99 | bare Key_Shared p50 | p99 | Carom p50 | Carom p99 "
    "| ratio p50 | ratio p99 | published->consumed p50 | p99 | consumed->computed p50 | p99 |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _producer_desc(s: PulsarSettings) -> str:
    if not s.batching:
        return "no batching"
    return f"batching {s.batching_type}, max delay {s.batching_max_delay_ms} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--rates", dest="rates_given", help="paced frames/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--hop",
        action="store_true",
        help="only the Pulsar hop: bare vs Carom at --rates (default 60,200,500,1000,2000); "
        "writes bench/results/pulsar-hop.{json,md}",
    )
    ap.add_argument(
        "--together",
        action="store_true",
        help="paced: publish each frame's truth together with its report, not a tick ahead",
    )
    ap.add_argument(
        "--versus",
        type=Path,
        metavar="CHECKOUT",
        help="only drains: the tracker of another checkout (e.g. a git worktree of the commit "
        "before a change) against this one's, --rounds times, producers batching off and on; "
        "writes bench/results/tracker-versus.{json,md}",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--scale",
        action="store_true",
        help="only drains: 1 and 2 tracker replicas on one backlog, --rounds times; writes "
        "bench/results/tracker-scale.{json,md}",
    )
    args = ap.parse_args()
    if args.scale:
        scale_main(args.frames, args.sessions, args.rounds)
        return
    if args.versus:
        versus_main(args.versus.resolve(), args.frames, args.sessions, args.rounds)
        return
    global TRUTH_AHEAD
    TRUTH_AHEAD = not args.together
    if args.hop:
        rates = [int(r) for r in (args.rates_given or "60,200,500,1000,2000").split(",")]
        hop_main(rates, args.seconds, args.sessions)
        return
    broker = local_pulsar.start()
    try:
        with tempfile.TemporaryDirectory(prefix="carom-bench-") as tmp:
            work = Path(tmp)
            d = drain(broker.service_url, args.frames, args.sessions, work)
            print("drain:", json.dumps(d))
            ps = []
            for rate in (int(r) for r in (args.rates_given or "200,500,1000").split(",")):
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
        cl = p["computed_to_result_received_ms"] or {"p50": "-", "p99": "-"}
        assert isinstance(pc, dict) and isinstance(pt, dict) and isinstance(cl, dict)
        paced_rows.append(
            f"| {p['rate_frames_per_s']:,} ({p['messages_per_s']:,} msg/s) | {p['rows_ok']:,} "
            f"| {pc['p50']} | {pc['p99']} | {pt['p50']} | {pt['p99']} | {cl['p50']} | {cl['p99']} |"
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
{d["bare_consumer_messages_per_s"]:,} messages/s. **The goal of 50,000 frames/s (100,000
messages/s) in one process is not reached** on these 2 cores: the broker on the same cores
spends about as much CPU per frame as the tracker (`tracker-profile.md`, which also says where
the tracker's time goes). `tracker-versus.md` has the drain before and after issue 21's changes,
in one run; `tracker-scale.md`, two replicas sharing the subscription.

## Paced ({args.sessions} sessions, {args.seconds} s per rate)

Latency from the report's publish stamp (`t_published_ns`) to the join (`t_computed_ns`), read
from the CSV, and to the tracker's receipt of the message (`published_to_tracker_ms`), in ms.
{_schedule()}

Live results go out once their rows are fsynced (never twice across a tracker crash):
computed->live is the row's join to its result's receipt by a plain consumer of the errors topic
(what a router sees), i.e. the wait for the fsync plus one more Pulsar hop.

| frames/s | rows | pub->computed p50 | p99 | pub->consumed p50 | p99 | computed->live p50 | p99 |
|---|---|---|---|---|---|---|---|
{paced_table}
"""
    (RESULTS / "tracker.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
