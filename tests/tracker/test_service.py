"""The tracker as it runs: a subprocess, the real broker, real Key_Shared subscriptions.

Truth and reports are published with the services' own producer settings (key-based batching,
keyed by session); the tests read back the CSV rows the tracker made durable.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec
import pulsar
import pytest

from carom import schemas
from carom_local.pulsar import Broker
from carom_runtime.config import PulsarSettings, TopicNames
from carom_runtime.pulsar_io import ensure_topics, make_producer, partition_count, quiet_logger
from carom_tracker import csvrow, records
from tests.services import Metrics, free_port, metric, scrape, service, wait_until

pytestmark = pytest.mark.integration

MISSED_FRAME = 5  # truth only: no report ever
NOT_DETECTED_FRAME = 7  # the browser found no ball
NOT_SENT_FRAME = 9  # skipped by the simulator: a not-sent record, no truth, no report
PARTITIONS = 4  # of the partitioned topics' tests


def _topics() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        k: f"persistent://public/default/test-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }


def _args(
    broker: Broker, topics: dict[str, str], metrics: Path, run: str, *extra: str
) -> list[str]:
    return [
        "--pulsar-url", broker.service_url,
        "--pulsar-topics-truth", topics["truth"],
        "--pulsar-topics-centroids", topics["centroids"],
        "--pulsar-topics-errors", topics["errors"],
        "--metrics-dir", str(metrics),
        "--run", run,
        "--window-s", "1",
        "--flush-interval-ms", "50",
        "--subscription", "trk",
        *extra,
    ]  # fmt: skip


def truth(sid: str, frame: int) -> schemas.Truth:
    return schemas.Truth(
        session_id=sid, frame=frame, rtp_ts=(1_000 + frame * 1500) % 2**32,
        x=100.0 + frame, y=50.0 + 0.5 * frame, t_render_ns=time.time_ns(),
    )  # fmt: skip


def report(t: schemas.Truth, detected: bool = True) -> schemas.Centroid:
    now = time.time_ns()
    return schemas.Centroid(
        session_id=t.session_id, rtp_ts=t.rtp_ts, detected=detected,
        x=t.x + 3.0 if detected else None, y=t.y + 4.0 if detected else None,
        t_browser_recv_ns=now, t_browser_analysed_ns=now, t_router_recv_ns=now,
        t_published_ns=now,
    )  # fmt: skip


class Feed:
    """Real producers with the services' settings (key-based batching keyed by session)."""

    def __init__(self, broker: Broker, topics: dict[str, str]) -> None:
        self.client = pulsar.Client(broker.service_url, logger=quiet_logger())
        settings = PulsarSettings(url=broker.service_url)
        self.truth = make_producer(self.client, topics["truth"], settings)
        self.reports = make_producer(self.client, topics["centroids"], settings)

    def send(
        self,
        msg: schemas.Truth
        | schemas.NotSent
        | schemas.SessionEnd
        | schemas.Centroid
        | schemas.ClientStats,
    ) -> None:
        centroid_topic = isinstance(msg, schemas.Centroid | schemas.ClientStats)
        producer = self.reports if centroid_topic else self.truth
        producer.send_async(schemas.encode(msg), None, partition_key=msg.session_id)

    def frames(
        self, sessions: list[str], frames: range, pace_s: float = 0.0, end: bool = False
    ) -> None:
        """Truth for every frame; a report for all but MISSED_FRAME (NOT_DETECTED_FRAME: none);
        NOT_SENT_FRAME is a not-sent record alone. ``end``: each session's end after its last."""
        for f in frames:
            for sid in sessions:
                t = truth(sid, f)
                if f == NOT_SENT_FRAME:
                    self.send(
                        schemas.NotSent(session_id=sid, frame=f, rtp_ts=t.rtp_ts,
                                        t_due_ns=t.t_render_ns, reason="late")
                    )  # fmt: skip
                    continue
                self.send(t)
                if f != MISSED_FRAME:
                    self.send(report(t, detected=f != NOT_DETECTED_FRAME))
            if pace_s:
                time.sleep(pace_s)
            elif f % 200 == 199:
                # Unpaced, stay under the producers' in-flight bound (max_pending_messages): past
                # it send_async refuses at once, and without batching every message counts.
                self.flush()
        if end:
            for sid in sessions:
                self.send(
                    schemas.SessionEnd(
                        session_id=sid, frames_due=frames.stop, t_end_ns=time.time_ns()
                    )
                )
        self.flush()

    def flush(self) -> None:
        self.truth.flush()
        self.reports.flush()

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def feed(pulsar_broker: Broker) -> Iterator[tuple[Feed, dict[str, str]]]:
    topics = _topics()
    f = Feed(pulsar_broker, topics)
    yield f, topics
    f.close()


@pytest.fixture
def partitioned_feed(pulsar_broker: Broker) -> Iterator[tuple[Feed, dict[str, str]]]:
    """Topics of ``PARTITIONS`` partitions, made as the services make them (ensure_topics)."""
    topics = _topics()
    ensure_topics(
        PulsarSettings(
            url=pulsar_broker.service_url, admin_url=pulsar_broker.admin_url,
            topics=TopicNames(**topics), partitions=PARTITIONS,
        )
    )  # fmt: skip
    f = Feed(pulsar_broker, topics)
    yield f, topics
    f.close()


def read_rows(folder: Path) -> list[csvrow.Row]:
    rows: list[csvrow.Row] = []
    for path in sorted(folder.glob("*.csv")):
        with path.open(newline="") as fh:
            rows.extend(csvrow.from_row(r) for r in csv.DictReader(fh))
    return rows


def wait_rows(folders: list[Path], want: int, timeout: float = 45.0) -> list[csvrow.Row]:
    """Every row (duplicates included) once ``want`` distinct (session, rtp_ts) are durable."""
    rows: list[csvrow.Row] = []

    def enough() -> bool:
        nonlocal rows
        rows = [r for f in folders if f.exists() for r in read_rows(f)]
        return len(distinct(rows)) >= want

    wait_until(
        enough,
        lambda: f"{want} distinct frames in {folders} (have {len(distinct(rows))})",
        timeout,
        every=0.2,
    )
    return rows


def distinct(rows: list[csvrow.Row]) -> set[tuple[str, int]]:
    return {(r.session_id, r.rtp_ts) for r in rows}


def test_rows_match_the_join(
    pulsar_broker: Broker, feed: tuple[Feed, dict[str, str]], tmp_path: Path
) -> None:
    f, topics = feed
    sessions = ["s-a", "s-b", "s-c"]
    errors = pulsar.Client(pulsar_broker.service_url, logger=quiet_logger())
    err_sub = errors.subscribe(
        topics["errors"], "t", initial_position=pulsar.InitialPosition.Earliest
    )
    port = free_port()
    args = _args(pulsar_broker, topics, tmp_path, "test")
    with service("carom_tracker", args, port, tmp_path / "tracker.log") as run:
        f.frames(sessions, range(12), end=True)
        orphan = report(truth("s-a", 999))
        f.send(orphan)  # a report whose truth never comes: counted, not written
        f.truth.send(b'{"kind":"truth","nope":1}', partition_key="s-a")  # invalid: acked, counted
        f.flush()
        rows = wait_rows([tmp_path / "test"], 36)

        def settled() -> Metrics | None:
            """The counters once the orphan's window has run out and every message is acked."""
            m = scrape(run.url)
            orphans = m.get("carom_tracker_join_total", 0.0, counter="orphans")
            return m if orphans >= 1 and m.get("carom_tracker_acks_total", 0.0) >= 70 else None

        metrics = wait_until(settled, "the orphan counted and 70 messages acked", timeout=15)
        health = httpx.get(f"{run.url}/health")
    assert health.status_code == 200
    assert sorted(p.name for p in (tmp_path / "test").glob("*.csv")) == [
        f"{s}.csv" for s in sessions
    ]
    rows = read_rows(tmp_path / "test")
    assert len(rows) == 36
    by_key = {(r.session_id, r.frame): r for r in rows}
    for sid in sessions:
        for frame in range(12):
            r = by_key[(sid, frame)]
            t = truth(sid, frame)
            if frame == NOT_SENT_FRAME:
                assert (r.status, r.reason, r.truth_x, r.x, r.l2) == (
                    "not_sent",
                    "late",
                    None,
                    None,
                    None,
                )
                assert r.rtp_ts == t.rtp_ts and r.t_render_ns is not None
                continue
            assert (r.rtp_ts, r.truth_x, r.truth_y) == (t.rtp_ts, t.x, t.y)
            if frame == MISSED_FRAME:
                assert (r.status, r.x, r.y, r.l2, r.t_published_ns) == (
                    "missed",
                    None,
                    None,
                    None,
                    None,
                )
            elif frame == NOT_DETECTED_FRAME:
                assert (r.status, r.x, r.y, r.l2) == ("not_detected", None, None, None)
                assert r.t_tracker_consumed_ns is not None
            else:
                assert (r.status, r.x, r.y, r.l2) == ("ok", t.x + 3.0, t.y + 4.0, 5.0)
                assert r.latencies_ms["published_to_tracker_ms"] is not None
    assert metrics.get("carom_tracker_messages_total", outcome="invalid", topic="truth") == 1
    assert metrics.get("carom_tracker_rows_total", outcome="written") == 36
    assert metrics.get("carom_tracker_join_total", counter="orphans") == 1
    # 30 joined rows (truth + report), 3 missed (truth), 3 not sent, the orphan, 3 session ends;
    # the invalid one is acked apart.
    assert metrics.get("carom_tracker_acks_total") == 70
    got: list[schemas.FrameResult | schemas.SessionResults] = []
    statuses = 0
    while len(got) < 39:
        msg = schemas.decode_errors_topic(err_sub.receive(timeout_millis=10_000).data())
        if isinstance(msg, schemas.TrackerStatus):
            statuses += 1  # the tracker says it is alive every second
            continue
        got.extend(m for m in _flat(msg) if not isinstance(m, schemas.TrackerStatus))
    results = [e for e in got if isinstance(e, schemas.FrameResult)]
    assert Counter(e.status for e in results) == {
        "ok": 27, "not_detected": 3, "missed": 3, "not_sent": 3
    }  # fmt: skip
    for sid in sessions:  # each session's end comes after every one of its 12 frames' results
        mine = [e for e in got if e.session_id == sid]
        assert len(mine) == 13 and isinstance(mine[-1], schemas.SessionResults)
        assert mine[-1].frames_due == 12
    errors.close()


def test_phases_and_browser_stats_are_kept_beside_the_csv_once(
    pulsar_broker: Broker, feed: tuple[Feed, dict[str, str]], tmp_path: Path
) -> None:
    """A session of two phases (a resolution change): rows carry phase and geometry; its end and
    the browser's stats land in its records file once each though published twice (as a
    redelivery would bring them), and the stats neither join nor count as invalid."""
    f, topics = feed
    sid, t0 = "ph-1", time.time_ns()
    stats = [
        schemas.ClientStats(session_id=sid, t_router_recv_ns=t0 + k, fps=30.0, freeze_count=k)
        for k in range(3)
    ]
    phases = [
        schemas.PhaseSummary(
            phase=n, state="streaming", first_frame=6 * n, frames_due=6, frames_sent=6,
            t_start_ns=t0 + n, t_end_ns=t0 + n + 1, fps=30.0, width=640 * (n + 1),
            height=480 * (n + 1), bitrate=0, keyframe_interval=0, gravity=0.0, vx=1.0, vy=0.0,
            cor=1.0, background="plain", bytes_sent=1000,
        ) for n in range(2)
    ]  # fmt: skip
    end = schemas.SessionEnd(session_id=sid, frames_due=12, t_end_ns=t0 + 2, phases=phases)
    with service("carom_tracker", _args(pulsar_broker, topics, tmp_path, "ph"), free_port(),
                 tmp_path / "tracker.log") as run:  # fmt: skip
        for frame in range(12):
            n = frame // 6
            t = msgspec.structs.replace(
                truth(sid, frame), phase=n, width=640 * (n + 1), height=480 * (n + 1)
            )
            f.send(t)
            f.send(report(t))
        for stat in (*stats, stats[1]):
            f.send(stat)
        f.send(end)
        f.send(end)
        f.flush()
        rows = wait_rows([tmp_path / "ph"], 12)

        def settled() -> Metrics | None:
            m = scrape(run.url)
            done = m.get("carom_tracker_session_records_total", 0.0, outcome="written") >= 4
            return m if done and m.get("carom_tracker_acks_total", 0.0) >= 30 else None

        metrics = wait_until(settled, "4 records written and 30 messages acked", timeout=15)
    assert sorted((r.frame, r.phase, r.width, r.height) for r in rows) == [
        (frame, frame // 6, 640 * (frame // 6 + 1), 480 * (frame // 6 + 1)) for frame in range(12)
    ]
    got = records.read([tmp_path / "ph" / f"{sid}{records.SUFFIX}"])
    assert got.duplicates == 0 and got.stats == stats and got.ends == [end]
    assert metrics.get("carom_tracker_session_records_total", outcome="duplicates_skipped") == 2
    assert metrics.get("carom_tracker_client_stats_total") == 4
    assert metrics.get("carom_tracker_messages_total", outcome="invalid", topic="centroids") == 0
    assert metrics.get("carom_tracker_join_total", counter="reports_in") == 12
    # 12 truths + 12 reports + 4 stats + 2 ends, every one acked after its record was durable
    assert metrics.get("carom_tracker_acks_total") == 30


@contextmanager
def killable(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A tracker the test may kill -9 (``tests.services.service`` insists on a clean stop)."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carom_tracker", "--http-port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_kill_9_and_restart_loses_no_frame_and_writes_none_twice(
    pulsar_broker: Broker, feed: tuple[Feed, dict[str, str]], tmp_path: Path
) -> None:
    f, topics = feed
    sessions = [f"k{i}" for i in range(8)]
    frames = 300
    log = tmp_path / "tracker.log"
    publisher = threading.Thread(target=f.frames, args=(sessions, range(frames), 0.005, True))
    with killable(_args(pulsar_broker, topics, tmp_path, "first"), log) as proc:
        publisher.start()
        wait_rows([tmp_path / "first"], 400, timeout=30)
        proc.kill()  # mid-stream: rows written but not yet fsynced/acked are redelivered
        proc.wait()
    publisher.join()  # the rest is published while no tracker runs
    # The restart is a new run (its own folder), as after a crash with the default run name.
    args = _args(pulsar_broker, topics, tmp_path, "second")
    with service("carom_tracker", args, free_port(), tmp_path / "tracker2.log") as run:
        rows = wait_rows([tmp_path / "first", tmp_path / "second"], len(sessions) * frames)
        # Kept: the test asserts no duplicate is ever written, and a wait for something that must
        # not happen can only be bounded. A window more: any late duplicate would be written by now.
        time.sleep(1.5)
        skipped = metric(run.url, "carom_tracker_rows_total", outcome="duplicates_skipped")
    rows = read_rows(tmp_path / "first") + read_rows(tmp_path / "second")
    keys = Counter((r.session_id, r.rtp_ts) for r in rows)
    expected = {(s, truth(s, fr).rtp_ts) for s in sessions for fr in range(frames)}
    assert set(keys) == expected  # no frame missing
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1][:5]  # none twice
    # every session kept the file it started in
    assert sorted(p.stem for p in (tmp_path / "first").glob("*.csv")) == sessions
    assert not list((tmp_path / "second").glob("*.csv"))
    print(f"kill -9 + restart: {len(rows)} rows, redelivered frames skipped: {skipped:g}")
    statuses = Counter(r.status for r in rows)
    assert statuses["missed"] == len(sessions)  # only MISSED_FRAME, nothing lost to the kill
    assert statuses["not_detected"] == len(sessions)
    assert statuses["not_sent"] == len(sessions)
    # Live results: published once their rows are durable; a redelivered frame whose row a killed
    # tracker wrote gets its result only if the errors topic lacks it. Exactly once each.
    live = Counter(
        (e.session_id, e.frame)
        for e in _errors_on(pulsar_broker, topics["errors"])
        if isinstance(e, schemas.FrameResult)
    )
    print(f"live results: {sum(live.values())} for {len(keys)} frames")
    assert max(live.values()) == 1, [k for k, n in live.items() if n > 1][:5]
    assert set(live) == {(r.session_id, r.frame) for r in rows}


def _errors_on(
    broker: Broker, topic: str
) -> list[schemas.FrameResult | schemas.SessionResults | schemas.TrackerStatus]:
    """Every message on the errors topic from its start (a reader leaves no subscription)."""
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    try:
        reader = client.create_reader(topic, pulsar.MessageId.earliest)
        out: list[schemas.FrameResult | schemas.SessionResults | schemas.TrackerStatus] = []
        while reader.has_message_available():
            out.extend(_flat(schemas.decode_errors_topic(reader.read_next(10_000).data())))
        return out
    finally:
        client.close()


def _flat(
    msg: schemas.FrameResult
    | schemas.FrameResults
    | schemas.SessionResults
    | schemas.TrackerStatus,
) -> list[schemas.FrameResult | schemas.SessionResults | schemas.TrackerStatus]:
    """A message of the errors topic with a ``FrameResults`` opened into its results, in order."""
    if isinstance(msg, schemas.FrameResults):
        return list(msg.results)
    return [msg]


def test_a_backlog_drains_without_false_misses(
    pulsar_broker: Broker, feed: tuple[Feed, dict[str, str]], tmp_path: Path
) -> None:
    """Both topics pre-loaded, then a tracker with a short window: the receivers stay aligned."""
    f, topics = feed
    sessions = [f"b{i:02d}" for i in range(16)]
    frames = 800
    # The subscription must exist before the backlog is published, or the broker keeps nothing.
    c = pulsar.Client(pulsar_broker.service_url, logger=quiet_logger())
    for name in ("truth", "centroids"):
        c.subscribe(topics[name], "trk", consumer_type=pulsar.ConsumerType.KeyShared).close()
    c.close()
    f.frames(sessions, range(frames))  # interleaved as live: each truth, then its report
    args = _args(pulsar_broker, topics, tmp_path, "drain", "--window-s", "0.1")
    with service("carom_tracker", args, free_port(), tmp_path / "drain.log") as run:
        rows = wait_rows([tmp_path / "drain"], len(sessions) * frames, timeout=60)
        waits = scrape(run.url).by("carom_tracker_align_wait_seconds_total", "topic")
    print(f"backlog of {len(rows)} frames; receive alignment waits (s): {waits}")
    statuses = Counter(r.status for r in rows)
    assert statuses == {
        "ok": len(sessions) * (frames - 3),
        "missed": len(sessions),  # MISSED_FRAME only
        "not_detected": len(sessions),
        "not_sent": len(sessions),
    }


def test_two_replicas_split_the_sessions(
    pulsar_broker: Broker, feed: tuple[Feed, dict[str, str]], tmp_path: Path
) -> None:
    _two_replicas(pulsar_broker, feed, tmp_path)


def test_two_replicas_split_the_sessions_of_partitioned_topics(
    pulsar_broker: Broker, partitioned_feed: tuple[Feed, dict[str, str]], tmp_path: Path
) -> None:
    """The same on 4-partition topics: a session's key keeps it on one partition, and a
    topic is caught up only when every partition is (else no ``missed`` row would come)."""
    partitions = ["--pulsar-partitions", str(PARTITIONS),
                  "--pulsar-admin-url", pulsar_broker.admin_url]  # fmt: skip
    _two_replicas(pulsar_broker, partitioned_feed, tmp_path, *partitions)
    _, topics = partitioned_feed
    for t in topics.values():
        assert partition_count(pulsar_broker.admin_url, t) == PARTITIONS


def _two_replicas(
    pulsar_broker: Broker, feed: tuple[Feed, dict[str, str]], tmp_path: Path, *extra: str
) -> None:
    f, topics = feed
    sessions = [f"r{i:02d}" for i in range(16)]
    frames = 40
    a, b = tmp_path / "a", tmp_path / "b"
    with (
        service("carom_tracker", _args(pulsar_broker, topics, tmp_path, "a", *extra),
                free_port(), tmp_path / "a.log"),
        service("carom_tracker", _args(pulsar_broker, topics, tmp_path, "b", *extra),
                free_port(), tmp_path / "b.log"),
    ):  # fmt: skip
        f.frames(sessions, range(frames), pace_s=0.005)
        rows = wait_rows([a, b], len(sessions) * frames)
    files_a = {p.stem for p in a.glob("*.csv")}
    files_b = {p.stem for p in b.glob("*.csv")}
    print(f"replica a: {len(files_a)} sessions, replica b: {len(files_b)} sessions")
    assert not files_a & files_b, "a session was written by both replicas"
    assert files_a | files_b == set(sessions)
    assert files_a and files_b, "one replica got every session"
    keys = Counter((r.session_id, r.rtp_ts) for r in rows)
    assert len(keys) == len(sessions) * frames
    assert max(keys.values()) == 1
    assert Counter(r.status for r in rows)["missed"] == len(sessions)


def test_sigterm_leaves_the_unjoined_for_the_next_run(
    pulsar_broker: Broker, feed: tuple[Feed, dict[str, str]], tmp_path: Path
) -> None:
    f, topics = feed
    sessions = ["u1", "u2"]
    truths = [truth(s, fr) for s in sessions for fr in range(20)]
    args = _args(pulsar_broker, topics, tmp_path, "test", "--window-s", "30")
    with service("carom_tracker", args, free_port(), tmp_path / "one.log") as run:
        for t in truths:
            f.send(t)
        f.flush()
        wait_until(
            lambda: metric(run.url, "carom_tracker_join_held", 0.0, what="pending_truth") == 40,
            "40 truths held by the joiner (the truths never reached it)",
            timeout=20,
        )
    # stopped with 40 truths waiting: no row, no ack
    assert read_rows(tmp_path / "test") == []
    assert "40 left unjoined" in (tmp_path / "one.log").read_text()
    with service("carom_tracker", args, free_port(), tmp_path / "two.log"):
        for t in truths:
            f.send(report(t))
        f.flush()
        rows = wait_rows([tmp_path / "test"], len(truths), timeout=30)
    assert len(rows) == len(truths)
    assert {r.status for r in rows} == {"ok"}  # redelivered truths joined, none declared missed


def test_bad_config_key_exits_2_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "tracker.yaml"
    cfg.write_text("window_s: 1.0\npulsar:\n  topicz: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "carom_tracker", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown config key 'pulsar.topicz'" in proc.stderr
