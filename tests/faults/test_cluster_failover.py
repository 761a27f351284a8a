"""Carom on a real Pulsar cluster through the loss of a broker, and of a bookie: nothing lost.

The cluster is ``local/pulsar cluster`` (1 ZooKeeper, 3 bookies, 2 brokers, ledgers with
ensemble 3, write quorum 2, ack quorum 2). The stack is the scaled-out one: one simulator, two
routers and two tracker replicas on one Key_Shared subscription, on topics with 4 partitions
(``pulsar.partitions``), with four Python client sessions at 30 fps spread over both routers.
Mid-run one node gets SIGKILL:

- the broker serving most of the topics' partitions: the other broker takes over its topics
  once its ZooKeeper session expires (6 s, ``broker.conf``); nothing is restarted;
- a bookie: with an ensemble of 3 out of 3 bookies, no new ledger can be made without it, so
  writes wait until it is back; it is restarted after ``BOOKIE_DOWN_S`` (what a StatefulSet
  would do), and what the wait cost is measured.

Streaming goes on until every session has live results again, well past the kill, then a few
seconds more. Afterwards every frame due of every session has exactly one CSV row across both
trackers, no live result was published twice, every session ended complete, and each topic's
recovery time (per partition, the longest silence a live reader saw from the kill on) is
printed and written to ``test-artifacts/cluster-failover-<broker|bookie>.json``.

The two trackers own half the sessions each (``--key-range 0/2`` and ``1/2``): with the
default auto-split, a failover wrote two frames' rows on both replicas (see
``TrackerSettings.key_range``).

Marked ``cluster``: not in the default run (about 1-1.5 minutes each, plus six more JVMs);
``./local/test --cluster`` runs them.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import shutil
import socket
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pulsar
import pytest

from carom import schemas
from carom.signaling import SessionParams
from carom_client.session import CaromSession, RouterInfo
from carom_local import cluster
from carom_local.pulsar import PulsarError
from carom_runtime.pulsar_io import admin_path, quiet_logger
from carom_tracker import csvrow
from carom_tracker.config import KEY_HASH_RANGE
from tests.services import free_port, service, wait_until, wait_until_async

# ``integration`` too, so the fast lane (-m "not integration") never starts a cluster either.
pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.timeout(900)]

SESSIONS = 4
FPS = 30
PARTITIONS = 4
BEFORE_S = 8.0  # streaming before the kill
RESUMED_S = 10.0  # live results this far past the kill mean the topics are back
AFTER_S = 5.0  # streaming on once they are
BOOKIE_DOWN_S = 15.0
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def pulsar_cluster() -> Iterator[cluster.Cluster]:
    try:
        c = cluster.start(timeout=300, quiet=True)
    except PulsarError as exc:
        pytest.fail(f"no Apache Pulsar cluster: {exc}", pytrace=False)
    yield c
    if c.started_here:
        cluster.stop()


class TopicWatch(threading.Thread):
    """Reads a topic live and keeps when each message arrived (wall clock, s), per partition.

    Per partition: the topic as a whole never falls silent while its partitions on the other
    broker go on, which would hide the lost ones' outage.
    """

    def __init__(self, client: pulsar.Client, topic: str) -> None:
        super().__init__(daemon=True)
        self.topic = topic
        self.reader = client.create_reader(topic, pulsar.MessageId.latest)
        self.times: dict[str, list[float]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                msg = self.reader.read_next(200)
            except pulsar.Timeout:
                continue
            except pulsar.PulsarException:
                self.halt.wait(0.2)
                continue
            part = msg.topic_name().rsplit("-partition-", 1)[-1]
            self.times.setdefault(part, []).append(time.time())

    def recovery(self, killed_at: float) -> dict[str, dict[str, float]]:
        """Per partition with messages on both sides of the kill: the longest silence from the
        last arrival before it on (the first arrivals after it can still be messages the dying
        node had served), and the kill to the end of that silence."""
        out = {}
        for part, times in sorted(self.times.items()):
            before = [t for t in times if t <= killed_at]
            after = [t for t in times if t > killed_at]
            if not before or not after:
                continue
            gap, first_back = max((b - a, b) for a, b in itertools.pairwise([before[-1], *after]))
            out[part] = {
                "silence_s": round(gap, 3),
                "kill_to_back_s": round(first_back - killed_at, 3),
            }
        assert out, (self.topic, {k: len(v) for k, v in self.times.items()})
        return out


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86 32-bit: the hash Pulsar's Key_Shared dispatch puts a key's bytes through."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF

    def mix(k: int) -> int:
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        return (k * c2) & mask

    h = seed
    whole = len(data) // 4 * 4
    for i in range(0, whole, 4):
        h ^= mix(int.from_bytes(data[i : i + 4], "little"))
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    if tail := data[whole:]:
        h ^= mix(int.from_bytes(tail, "little"))
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_murmur3_32_gives_the_reference_values() -> None:
    """Published test vectors of MurmurHash3 x86_32 (seed 0), so the split below is the broker's."""
    assert murmur3_32(b"") == 0
    assert murmur3_32(b"hello") == 0x248BFA47
    assert murmur3_32(b"hello, world") == 0x149BBB7F
    assert murmur3_32(b"The quick brown fox jumps over the lazy dog") == 0x2E4FF723


def _sessions(tag: str) -> list[str]:
    """Session ids whose keys fall half in each tracker's range (``--key-range 0/2``, ``1/2``):
    the broker's sticky Key_Shared slot is the key's murmur3 hash (sign bit off) mod 65,536."""
    halves: list[list[str]] = [[], []]
    i = 0
    while min(len(h) for h in halves) < SESSIONS // 2:
        sid = f"fo-{tag}-{i}"
        slot = (murmur3_32(sid.encode()) & 0x7FFFFFFF) % KEY_HASH_RANGE
        half = halves[slot * 2 // KEY_HASH_RANGE]
        if len(half) < SESSIONS // 2:
            half.append(sid)
        i += 1
    return [sid for pair in zip(*halves, strict=True) for sid in pair]


def _owners(admin_url: str, topics: dict[str, str]) -> dict[str, str]:
    """Which broker serves each partition of ``topics`` (``name-partition-N``: broker URL)."""
    owners = {}
    for topic in topics.values():
        for i in range(PARTITIONS):
            path = f"{admin_path(topic)}-partition-{i}"
            with urllib.request.urlopen(f"{admin_url}/lookup/v2/topic/{path}", timeout=10) as r:
                owners[f"{topic.rsplit('/', 1)[1]}-partition-{i}"] = json.load(r)["brokerUrl"]
    return owners


def _busiest_broker(owners: dict[str, str]) -> str:
    """The node name of the broker serving most partitions: the one whose loss costs most."""
    url = Counter(owners.values()).most_common(1)[0][0]
    port = int(url.rsplit(":", 1)[1])
    return next(b.name for b in cluster.BROKER_NODES if b.port == port)


def _settled(url: str) -> bool:
    """A service's /health is 200 (its broker link up) and, for a tracker, no result queued."""
    try:
        r = httpx.get(f"{url}/health", timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and not r.json().get("results_queued", 0)


def _rows(paths: list[Path]) -> list[csvrow.Row]:
    rows: list[csvrow.Row] = []
    for path in paths:
        with path.open(newline="") as f:
            rows += [csvrow.from_row(r) for r in csv.DictReader(f)]
    return rows


def _read_audit(client: pulsar.Client, topic: str) -> list[bytes]:
    """Everything the ``audit`` subscription kept of ``topic``.

    A subscription, not a reader from the earliest message: with no retention set, the broker
    deletes a ledger every subscription has acknowledged once it is rolled over, which a
    failover does (the errors topic has no durable subscription at all): a reader would find the
    topic's messages from before the kill gone.
    """
    consumer = client.subscribe(topic, "audit", initial_position=pulsar.InitialPosition.Earliest)
    out = []
    try:
        while True:
            msg = consumer.receive(5_000)
            out.append(msg.data())
            consumer.acknowledge(msg)
    except pulsar.Timeout:
        return out
    finally:
        consumer.unsubscribe()


def _keep_logs(source: Path, dest: Path) -> None:
    """The services' logs of the last run, kept whether it passed or not (for a failure's cause)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for log in source.glob("*.log"):
        shutil.copy(log, dest / log.name)


@pytest.mark.parametrize("role", ["broker", "bookie"])
def test_losing_a_node_loses_no_frame_and_doubles_none(
    pulsar_cluster: cluster.Cluster, role: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    topics = {
        k: f"persistent://public/default/fo-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }
    common = ["--pulsar-url", pulsar_cluster.service_url,
              "--pulsar-admin-url", pulsar_cluster.admin_url,
              "--pulsar-partitions", str(PARTITIONS)]  # fmt: skip
    common += [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    # Each producer's and consumer's (re)connections per partition, in the logs kept below.
    common += ["--pulsar-client-log", "info"]
    spool = ["--pulsar-spool-dir", str(tmp_path / "spool")]
    sids = _sessions(tag)
    metrics = [tmp_path / "metrics-a", tmp_path / "metrics-b"]

    def tracker_args(i: int) -> list[str]:
        # Each replica owns half the sessions for good (TrackerSettings.key_range): auto-split
        # hands a reconnecting replica the other's sessions, and rows are then written twice.
        return [*common, "--metrics-dir", str(metrics[i]), "--run", "fo",
                "--subscription", f"fo-{tag}", "--key-range", f"{i}/2"]  # fmt: skip

    with ExitStack() as stack:
        stack.callback(_keep_logs, tmp_path, ARTIFACTS / f"cluster-failover-{role}-logs")
        sim = stack.enter_context(
            service("carom_simulator", [*common, *spool], free_port(), tmp_path / "sim.log")
        )
        trackers = [
            stack.enter_context(
                service("carom_tracker", tracker_args(i), free_port(), tmp_path / f"tr{i}.log")
            )
            for i in range(len(metrics))
        ]
        routers = []
        for i in range(2):
            args = [*common, *spool, "--simulator-url", sim.url,
                    "--webtransport-port", str(free_port(socket.SOCK_DGRAM))]  # fmt: skip
            routers.append(
                stack.enter_context(
                    service("carom_router", args, free_port(), tmp_path / f"router{i}.log")
                )
            )
        watch_client = pulsar.Client(pulsar_cluster.service_url, logger=quiet_logger())
        stack.callback(watch_client.close)
        for t in topics.values():  # holds every message for the count at the end
            watch_client.subscribe(
                t, "audit", initial_position=pulsar.InitialPosition.Earliest
            ).close()
        watches = {k: TopicWatch(watch_client, t) for k, t in topics.items()}
        for w in watches.values():
            w.start()
            stack.callback(w.halt.set)
        # The services made the partitioned topics at start: the broker to lose is the one
        # serving most of their partitions (a bookie: any, every ledger spans all three).
        owners = _owners(pulsar_cluster.admin_url, topics)
        victim = _busiest_broker(owners) if role == "broker" else "bookie-1"
        killed_at = 0.0
        restarted_in: float | None = None

        async def run() -> list[CaromSession]:
            nonlocal killed_at, restarted_in
            infos = [await RouterInfo.fetch(r.url) for r in routers]
            sessions = [
                CaromSession(infos[i % 2], sid, SessionParams(fps=FPS))
                for i, sid in enumerate(sids)
            ]
            await asyncio.gather(*(s.open() for s in sessions))
            loop = asyncio.get_running_loop()
            try:
                # A cluster just started loads each partition on its first use: wait for live
                # results before the clock of the run starts.
                await wait_until_async(
                    lambda: all(s.live_errors for s in sessions),
                    "live results at every session before the kill",
                    timeout=60,
                    every=0.2,
                )
                await asyncio.sleep(BEFORE_S)  # kept: the run's length is what is checked
                killed_at = time.time()
                await loop.run_in_executor(None, cluster.kill, victim)
                if role == "bookie":
                    await asyncio.sleep(BOOKIE_DOWN_S)  # kept: the outage
                    restarted_in = await loop.run_in_executor(None, cluster.restart, victim)
                at_kill = [max(e.frame for e in s.live_errors) for s in sessions]

                def newest() -> list[int]:
                    return [
                        max(e.frame for e in s.live_errors) - k
                        for s, k in zip(sessions, at_kill, strict=True)
                    ]

                await wait_until_async(
                    lambda: min(newest()) > FPS * RESUMED_S,
                    lambda: (
                        f"live results {RESUMED_S} s past the kill (frames past it: {newest()})"
                    ),
                    timeout=240,
                    every=0.5,
                )
                await asyncio.sleep(AFTER_S)  # kept: streaming on once recovered
                # Every service's link up and nothing queued before the end: after a bookie's
                # return the ledgers of some partitions fail over again for a while (seen: a
                # tracker lost its link again 2 s after it was back), and a service stopped
                # then cannot drain in its 30 s.
                await loop.run_in_executor(
                    None,
                    lambda: wait_until(
                        lambda: all(_settled(svc.url) for svc in [*trackers, *routers, sim]),
                        "every service's broker link up with nothing queued",
                        timeout=180,
                    ),
                )
            finally:
                await asyncio.gather(*(s.close(drain_timeout=240) for s in sessions))
            return sessions

        with ThreadPoolExecutor(1) as pool:
            sessions = pool.submit(asyncio.run, run()).result(timeout=800)
        recovery = {k: w.recovery(killed_at) for k, w in watches.items()}
        texts = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}

    if role == "broker":
        cluster.restart(victim)  # the next test starts from a whole cluster
    # Once the trackers are stopped: they say they are alive on the errors topic every second.
    audit_client = pulsar.Client(pulsar_cluster.service_url, logger=quiet_logger())
    try:
        errors = _read_audit(audit_client, topics["errors"])
    finally:
        audit_client.close()

    results = [schemas.decode_errors_topic(d) for d in errors]
    frame_results = Counter(
        (r.session_id, r.frame) for msg in results for r in schemas.results_in(msg)
    )
    report: dict[str, object] = {
        "victim": victim,
        "partition_owners_before": owners,
        "cluster": "1 ZooKeeper, 3 bookies, 2 brokers; ensemble 3, write 2, ack 2",
        "partitions": PARTITIONS,
        "sessions": SESSIONS,
        "fps": FPS,
        "recovery": recovery,
        "bookie_restart_s": restarted_in,
    }
    details: dict[str, dict[str, object]] = {}
    wrote: set[str] = set()
    for s in sessions:
        assert s.end is not None and s.end.complete, (s.session_id, s.end)
        due = s.end.frames_due
        assert due is not None and due >= FPS * (BEFORE_S + RESUMED_S + AFTER_S) * 0.9, due
        files = [m / "fo" / f"{s.session_id}.csv" for m in metrics]
        rows = [r for r in _rows([f for f in files if f.exists()]) if r.status != "orphan"]
        frames = Counter(r.frame for r in rows)
        assert set(frames) == set(range(due)), sorted(set(range(due)) - set(frames))[:10]
        assert max(frames.values()) == 1, [f for f, n in frames.items() if n > 1][:10]
        live = [n for (sid, _), n in frame_results.items() if sid == s.session_id]
        assert len(live) == due and max(live) == 1, (len(live), due, max(live))
        statuses = Counter(r.status for r in rows)
        writers = [f.parent.parent.name for f in files if f.exists()]
        wrote.update(writers)
        details[s.session_id] = {
            "frames_due": due, "statuses": dict(statuses), "written_by": writers,
        }  # fmt: skip
        print(f"{s.session_id}: {due} frames due, {dict(statuses)}, rows by {writers}")
    report["sessions_detail"] = details
    assert wrote == {"metrics-a", "metrics-b"}, wrote  # both replicas had sessions of their own
    for name, text in texts.items():
        assert "Traceback" not in text, (name, text[-3000:])
    worst = {k: max(p["silence_s"] for p in parts.values()) for k, parts in recovery.items()}
    report["longest_silence_s"] = worst
    print(f"{victim} killed: longest silence of a partition per topic {worst}; per partition "
          f"{recovery}; bookie back in {restarted_in}")  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"cluster-failover-{role}.json").write_text(json.dumps(report, indent=2))
