"""The recorder as it runs: a subprocess against the real broker, channel records published
with pulsar-client to fresh topics (a routes file of their own), its files read back.

Every message is written once (a second publish of the same seq is dropped and counted), the
router's ChannelEnd finalizes each type's files and summary (a gap named), two replicas on the
Key_Shared subscription split the sessions and together write every message once, and a
restart that gets everything again from the broker writes nothing twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pulsar
import pytest
import yaml

from carom.channels import ChannelMessage, Record, encode_record
from carom_cli.main import admin_path
from carom_local.pulsar import Broker
from carom_recorder.store import read_chunks, read_rows
from carom_runtime import media
from carom_runtime.pulsar_io import quiet_logger
from tests.recorder import records
from tests.services import Running, free_port, metric, service, wait_until

FORMATS = {"camera": "video", "microphone": "audio", "chat": "text", "points": "points"}


@pytest.fixture
def routes(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A routes file with a fresh topic per type: type -> topic."""
    tag = uuid.uuid4().hex[:10]
    topics = {t: f"persistent://public/default/test-rec-{t}-{tag}" for t in FORMATS}
    tree = {
        "version": 1,
        "routes": {
            t: {"topic": topics[t], "format": FORMATS[t], "max_message_bytes": 16 * 1024 * 1024}
            for t in FORMATS
        },
    }
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, topics


@contextmanager
def recorder(
    broker: Broker, routes_file: Path, out: Path, log: Path, subscription: str, idle_s: float = 120
) -> Iterator[Running]:
    args = [
        "--pulsar-url", broker.service_url, "--routes-file", str(routes_file),
        "--out-dir", str(out), "--subscription", subscription, "--idle-finalize-s", str(idle_s),
    ]  # fmt: skip
    with service("carom_recorder", args, free_port(), log) as running:
        yield running


def publish(broker: Broker, topics: dict[str, str], recs: Sequence[Record]) -> None:
    """Each record on its type's topic, keyed by session, as the router publishes them (one
    entry each; chunked above the broker's 5 MB)."""
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    try:
        producers = {
            t: client.create_producer(topic, batching_enabled=False, chunking_enabled=True)
            for t, topic in topics.items()
        }
        for r in recs:
            producers[r.type].send(encode_record(r), partition_key=r.session_id)
        for p in producers.values():
            p.flush()
    finally:
        client.close()


def publish_raw(broker: Broker, topic: str, payloads: Sequence[bytes]) -> None:
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    try:
        producer = client.create_producer(topic, batching_enabled=False)
        for data in payloads:
            producer.send(data, partition_key="s1")
    finally:
        client.close()


def summary(out: Path, session: str, type_: str) -> dict[str, Any] | None:
    path = out / session / f"{type_}.summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_every_message_once_ends_finalize_and_the_report_tells(
    pulsar_broker: Broker, routes: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    routes_file, topics = routes
    out = tmp_path / "rec"
    cam = records.video("s1", records.vp8_chunks(20))
    mic = records.audio("s1", records.opus_chunks(30))
    chat = records.chat("s1", ["hello", "second", "third ✓"])
    cloud = records.points("s1", 3, count=2000)
    # Another session's chat: seq 2 never arrives, seq 4 was refused by the router.
    gap = [m for m in records.chat("s2", [f"m{i}" for i in range(6)]) if m.seq not in (2, 4)]
    gap_end = records.end_of(gap, refused=[4])
    gap_end = msgspec.structs.replace(gap_end, accepted=5)
    big = records.points("s3", 1, count=500_000)  # 6 MB: chunked on Pulsar
    recs: list[Record] = [*cam[:8], cam[5], *cam[8:], *mic, *chat, *cloud, *gap, *big]  # cam 5 x2
    ends = [records.end_of(m) for m in (cam, mic, chat, cloud, big)]
    bad_points = msgspec.structs.replace(cloud[0], seq=99, payload=b"\x00" * 13)
    invalid = [b"not a record", encode_record(cam[0]), encode_record(bad_points)]
    with recorder(pulsar_broker, routes_file, out, tmp_path / "rec.log", "rec-a") as rec:
        publish_raw(pulsar_broker, topics["points"], invalid)  # refused, counted, never written
        publish(pulsar_broker, topics, [*recs, *ends, gap_end])
        for type_ in FORMATS:
            wait_until(lambda t=type_: summary(out, "s1", t), f"s1 {type_} finalized", 60)  # type: ignore[misc]
        wait_until(lambda: summary(out, "s2", "chat"), "s2 chat finalized", 30)
        wait_until(lambda: summary(out, "s3", "points"), "s3 points finalized", 30)
        assert metric(rec.url, "carom_recorder_messages_total", type="camera",
                      outcome="duplicates") == 1  # fmt: skip
        assert metric(rec.url, "carom_recorder_messages_total", type="camera",
                      outcome="written") == 20  # fmt: skip
        assert metric(rec.url, "carom_recorder_sessions_total", type="chat",
                      outcome="not_exactly_once") == 1  # fmt: skip
        assert metric(rec.url, "carom_recorder_messages_total", type="points",
                      outcome="invalid") == 3  # fmt: skip
    assert rec.text().count("dropping invalid message") == 3
    s1 = out / "s1"
    cam_sum = summary(out, "s1", "camera")
    assert cam_sum is not None
    assert cam_sum["exactly_once"] and cam_sum["received"] == 20
    assert (cam_sum["duplicates_dropped"], cam_sum["duplicate_seqs"]) == (1, [5])
    assert cam_sum["media"] == {
        "file": "camera.webm", "codec": "vp8", "chunks": 20, "packets": 20,
        "skipped_before_keyframe": 0, "decoded_frames": 20,
    }  # fmt: skip
    assert media.count_frames(s1 / "camera.webm") == 20
    rows = read_rows(s1 / "camera.latency.csv")
    assert sorted(r.seq for r in rows) == list(range(20))
    assert all(r.t_consumed_ns >= r.t_published_ns for r in rows)
    assert [f.seq for f in read_chunks(s1 / "camera.chunks")] == list(range(20))
    mic_sum = summary(out, "s1", "microphone")
    assert mic_sum is not None and mic_sum["exactly_once"]
    assert isinstance(mic_sum["media"], dict) and mic_sum["media"]["decoded_frames"] == len(mic)
    texts = [json.loads(x)["text"] for x in (s1 / "chat.jsonl").read_text().splitlines()]
    assert texts == ["hello", "second", "third ✓"]
    assert len(list((s1 / "points").glob("*.npy"))) == 3  # not the invalid #99
    latency = cam_sum["latency_ms"]
    assert isinstance(latency, dict) and latency["published_to_consumed"]["count"] == 20
    s3 = summary(out, "s3", "points")
    assert s3 is not None and s3["exactly_once"] and s3["bytes"] == 6_000_000
    assert np.load(out / "s3" / "points" / "000000000.npy").tobytes() == big[0].payload
    s2 = summary(out, "s2", "chat")
    assert s2 is not None and s2["verdict"] == "missing" and s2["missing_seqs"] == [2]
    assert s2["refused"] == 1 and s2["received"] == 4
    report = subprocess.run(
        [sys.executable, "-m", "carom_recorder", "report", str(out)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "s1 camera: exactly_once, received 20 of 20" in report
    assert "duplicates dropped 1" in report and "camera.webm: 20 frames decoded" in report
    assert "s2 chat: missing, received 4 of 5" in report and "missing 1: 2" in report
    assert report.rstrip().endswith("5 of 6 exactly once")


def test_two_replicas_split_the_sessions_and_record_each_message_once(
    pulsar_broker: Broker, routes: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    routes_file, topics = routes
    outs = [tmp_path / "a", tmp_path / "b"]
    sessions = [f"r{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(20)]
    recs: list[Record] = []
    for s in sessions:
        msgs = records.chat(s, [f"{s} says {i}" for i in range(10)])
        recs += [*msgs, records.end_of(msgs)]
    with (
        recorder(pulsar_broker, routes_file, outs[0], tmp_path / "a.log", "rec-ks") as a,
        recorder(pulsar_broker, routes_file, outs[1], tmp_path / "b.log", "rec-ks") as b,
    ):
        publish(pulsar_broker, topics, recs)

        def finalized() -> int:
            return sum(1 for o in outs for s in sessions if summary(o, s, "chat"))

        wait_until(lambda: finalized() == len(sessions), lambda: f"{finalized()} finalized", 60)
        written = [
            metric(r.url, "carom_recorder_messages_total", type="chat", outcome="written")
            for r in (a, b)
        ]
    assert sum(written) == 10 * len(sessions) and all(written), written
    for s in sessions:
        where = [o for o in outs if (o / s).exists()]
        assert len(where) == 1, (s, where)
        got = summary(where[0], s, "chat")
        assert got is not None and got["exactly_once"] and got["received"] == 10
        assert len((where[0] / s / "chat.jsonl").read_text().splitlines()) == 10


def reset_cursor(broker: Broker, topic: str, subscription: str) -> None:
    """Rewind a subscription to the topic's start: every message is delivered again."""
    url = (
        f"{broker.admin_url}/admin/v2/{admin_path(topic)}/subscription/{subscription}/resetcursor/0"
    )
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=30):
        pass


def test_a_restart_that_gets_everything_again_writes_nothing_twice(
    pulsar_broker: Broker, routes: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    routes_file, topics = routes
    out = tmp_path / "rec"
    cam: list[ChannelMessage] = records.video("s1", records.vp8_chunks(20))
    with recorder(pulsar_broker, routes_file, out, tmp_path / "1.log", "rec-restart"):
        publish(pulsar_broker, topics, cam[:12])
        wait_until(lambda: len(read_rows(out / "s1" / "camera.latency.csv")) == 12, "12 rows", 30)
    # As after a crash before the acks: the broker hands every message over again.
    reset_cursor(pulsar_broker, topics["camera"], "rec-restart")
    with recorder(pulsar_broker, routes_file, out, tmp_path / "2.log", "rec-restart") as rec:
        publish(pulsar_broker, topics, [*cam[12:], records.end_of(cam)])
        wait_until(lambda: summary(out, "s1", "camera"), "camera finalized", 60)
        assert metric(rec.url, "carom_recorder_messages_total", type="camera",
                      outcome="redelivered") == 12  # fmt: skip
        assert metric(rec.url, "carom_recorder_messages_total", type="camera",
                      outcome="written") == 8  # fmt: skip
    got = summary(out, "s1", "camera")
    assert got is not None and got["exactly_once"] and got["received"] == 20
    assert got["duplicates_dropped"] == 0
    assert isinstance(got["media"], dict) and got["media"]["decoded_frames"] == 20
    assert sorted(r.seq for r in read_rows(out / "s1" / "camera.latency.csv")) == list(range(20))
    assert [f.seq for f in read_chunks(out / "s1" / "camera.chunks")] == list(range(20))


def test_a_silent_type_is_finalized_as_it_is_and_reopened_by_its_end(
    pulsar_broker: Broker, routes: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    routes_file, topics = routes
    out = tmp_path / "rec"
    chat = records.chat("s1", ["one", "two", "three"])
    with recorder(pulsar_broker, routes_file, out, tmp_path / "r.log", "rec-idle", 1.0) as rec:
        publish(pulsar_broker, topics, chat)
        first = wait_until(lambda: summary(out, "s1", "chat"), "chat finalized when idle", 30)
        assert first["verdict"] == "no_end" and first["received"] == 3
        assert metric(rec.url, "carom_recorder_sessions_total", type="chat",
                      outcome="finalized_idle") == 1  # fmt: skip
        publish(pulsar_broker, topics, [records.end_of(chat)])
        done = wait_until(
            lambda: (s := summary(out, "s1", "chat")) and s["verdict"] != "no_end" and s,
            "chat finalized by its end", 30,
        )  # fmt: skip
    assert done["exactly_once"] and done["received"] == 3 and done["accepted_by_router"] == 3
    assert len((out / "s1" / "chat.jsonl").read_text().splitlines()) == 3


def test_a_kill_mid_stream_loses_nothing_and_doubles_nothing(
    pulsar_broker: Broker, routes: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    routes_file, topics = routes
    out = tmp_path / "rec"
    cam = records.video("s1", records.vp8_chunks(300))
    csv_path = out / "s1" / "camera.latency.csv"
    port = free_port()
    args = [
        sys.executable, "-m", "carom_recorder", "--http-port", str(port),
        "--pulsar-url", pulsar_broker.service_url, "--routes-file", str(routes_file),
        "--out-dir", str(out), "--subscription", "rec-kill",
    ]  # fmt: skip
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _healthy(port), "the first recorder healthy", 60)
        publish(pulsar_broker, topics, cam)
        wait_until(lambda: csv_path.exists() and csv_path.stat().st_size > 0, "first rows", 30)
    finally:
        proc.kill()  # wherever it is: between a write and its row, a row and its ack
        proc.wait(30)
    with recorder(pulsar_broker, routes_file, out, tmp_path / "2.log", "rec-kill"):
        publish(pulsar_broker, topics, [records.end_of(cam)])
        got = wait_until(lambda: summary(out, "s1", "camera"), "camera finalized", 60)
    assert got["exactly_once"] and got["received"] == 300, got
    assert got["duplicates_dropped"] == 0
    assert got["media"]["decoded_frames"] == 300
    seqs = [r.seq for r in read_rows(csv_path)]
    assert sorted(seqs) == list(range(300))  # each once
    assert sorted({f.seq for f in read_chunks(out / "s1" / "camera.chunks")}) == list(range(300))


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
