"""The simulator service as it runs: a subprocess, the real broker, a real aiortc client.

A Python aiortc client negotiates over HTTP, receives H.264 at 60 fps, decodes every frame, finds
the ball and matches each decoded frame to its truth message by RTP timestamp.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pulsar
import pytest

from carom import schemas
from carom_client.video import DecodedFrame
from carom_local.pulsar import Broker
from carom_runtime.ice import set_host_addresses
from carom_runtime.pulsar_io import quiet_logger
from tests.services import SIMULATOR_AUTH, SIMULATOR_TOKEN, TOKEN_ENV, scrape, wait_until
from tests.simulator.direct import open_direct

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Simulator:
    url: str
    truth_topic: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def simulator(
    pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Simulator]:
    port = free_port()
    topic = f"persistent://public/default/test-truth-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("simulator") / "simulator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "carom_simulator",
                "--http-port",
                str(port),
                "--pulsar-url",
                pulsar_broker.service_url,
                "--pulsar-topics-truth",
                topic,
                "--max-sessions",
                "3",
                "--connect-timeout-s",
                "8",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, TOKEN_ENV["carom_simulator"]: SIMULATOR_TOKEN},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"simulator exited at start:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"simulator not healthy after 60 s:\n{log.read_text()}")
    yield Simulator(url, topic, proc)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("simulator did not stop within 30 s of SIGTERM")
    # uvicorn re-raises the signal it caught once shutdown is complete.
    text = log.read_text()
    assert rc in (0, -signal.SIGTERM), text[-3000:]
    assert "simulator stopped: truth sent" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


class TruthCollector(threading.Thread):
    """Reads the truth topic from the start on a thread of its own."""

    def __init__(self, broker: Broker, topic: str) -> None:
        super().__init__(daemon=True)
        self.client = pulsar.Client(broker.service_url, logger=quiet_logger())
        self.reader = self.client.create_reader(topic, pulsar.MessageId.earliest)
        self.by_session: dict[str, dict[int, schemas.Truth]] = {}
        self.not_sent: dict[str, list[schemas.NotSent]] = {}
        self.ends: dict[str, schemas.SessionEnd] = {}
        self.order: dict[str, list[int | None]] = {}  # frame per record, None for the end
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                msg = self.reader.read_next(200)
            except pulsar.Timeout:
                continue
            record = schemas.decode_truth_topic(msg.data())
            sid = record.session_id
            assert msg.partition_key() == sid
            if isinstance(record, schemas.Truth):
                self.by_session.setdefault(sid, {})[record.rtp_ts] = record
            elif isinstance(record, schemas.NotSent):
                self.not_sent.setdefault(sid, []).append(record)
            else:
                self.ends[sid] = record
            frame = None if isinstance(record, schemas.SessionEnd) else record.frame
            self.order.setdefault(sid, []).append(frame)

    def close(self) -> None:
        self.stop_flag.set()
        self.join(5)
        self.client.close()


async def _watch(
    url: str, sid: str, seconds: float, params: dict[str, object]
) -> tuple[list[DecodedFrame], dict[str, object], str | None]:
    frames: list[DecodedFrame] = []
    client, answer = await open_direct(url, sid, frames.append, params)
    try:
        await asyncio.sleep(seconds)  # kept: the test watches a stretch of this length
        async with httpx.AsyncClient(headers=SIMULATOR_AUTH) as http:
            assert (await http.delete(f"{url}/sessions/{sid}")).status_code == 204
            assert (await http.delete(f"{url}/sessions/{sid}")).status_code == 404
    finally:
        await client.close()
    return frames, answer, client.codec


def test_h264_frames_match_their_truth(simulator: Simulator, pulsar_broker: Broker) -> None:
    set_host_addresses(["127.0.0.1"])
    collector = TruthCollector(pulsar_broker, simulator.truth_topic)
    collector.start()
    sid = f"t-{uuid.uuid4().hex[:8]}"
    try:
        frames, answer, codec = asyncio.run(
            _watch(simulator.url, sid, 4.0, {"fps": 60, "gravity": 980, "cor": 0.98, "vx": 400})
        )
        wait_until(  # the last truth messages are on their way
            lambda: sid in collector.ends, "the session's end on the truth topic", 10, every=0.05
        )
    finally:
        collector.close()
    assert codec == "H264" and answer["codec"] == "H264"
    truth = collector.by_session.get(sid, {})
    assert len(frames) >= 3 * 60 * 0.95, f"only {len(frames)} frames decoded in 4 s at 60 fps"
    matched = [(f, truth[f.rtp_ts]) for f in frames if f.rtp_ts in truth]
    rate = len(matched) / len(frames)
    errors = [math.dist(f.centroid, (t.x, t.y)) for f, t in matched if f.centroid is not None]
    mean_l2 = sum(errors) / len(errors)
    print(
        f"\nframes {len(frames)}, matched {rate:.2%}, mean L2 {mean_l2:.3f} px, "
        f"max {max(errors):.3f} px, truth msgs {len(truth)}"
    )
    assert rate >= 0.99
    assert len(errors) == len(matched)  # the ball is always found
    assert mean_l2 < 0.5
    # Consecutive frames carry consecutive frame numbers, 1500 ticks apart at 60 fps.
    by_frame = sorted(t.frame for _, t in matched)
    assert by_frame == sorted(set(by_frame))
    # Every frame due has exactly one record (a truth, or not-sent if skipped as late), in
    # order, and the session's end comes last and counts them all.
    end = collector.ends[sid]
    order = collector.order[sid]
    assert order[-1] is None and order[:-1] == list(range(end.frames_due))
    assert len(truth) + len(collector.not_sent.get(sid, [])) == end.frames_due


def test_sessions_list_and_delete(simulator: Simulator) -> None:
    assert httpx.get(f"{simulator.url}/sessions", headers=SIMULATOR_AUTH).json() == []
    assert httpx.delete(f"{simulator.url}/sessions/nope", headers=SIMULATOR_AUTH).status_code == 404


VP8_ONLY = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n"
    "a=rtcp-mux\r\na=rtpmap:96 VP8/90000\r\n"
    "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"session_id": "a1", "sdp": VP8_ONLY}, 400, "cannot receive H264"),
        ({"session_id": "a2", "sdp": "v=0\r\nthis is not sdp\r\n"}, 400, "no video"),
        ({"session_id": "bad id!", "sdp": VP8_ONLY}, 422, "session_id"),
        ({"session_id": "a3", "sdp": VP8_ONLY, "params": {"fps": -1}}, 422, "params.fps"),
        ({"session_id": "a4"}, 422, "sdp"),
    ],
)
def test_bad_offers_get_a_clear_4xx(
    simulator: Simulator, body: dict[str, object], status: int, needle: str
) -> None:
    r = httpx.post(f"{simulator.url}/offer", json=body, headers=SIMULATOR_AUTH)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert httpx.get(f"{simulator.url}/sessions", headers=SIMULATOR_AUTH).json() == []


def test_malformed_json_and_oversize(simulator: Simulator) -> None:
    r = httpx.post(f"{simulator.url}/offer", content=b"{not json", headers=SIMULATOR_AUTH)
    assert r.status_code == 422 and "invalid offer request" in r.json()["detail"]
    r = httpx.post(f"{simulator.url}/offer", content=b"x" * 200_000, headers=SIMULATOR_AUTH)
    assert r.status_code == 413


async def _fill(url: str, n: int) -> list[tuple[int, str]]:
    from carom_client.video import VideoClient

    out = []
    clients = [VideoClient(lambda f: None) for _ in range(n)]
    try:
        async with httpx.AsyncClient(timeout=20, headers=SIMULATOR_AUTH) as http:
            for i, c in enumerate(clients):
                sdp = await c.offer()
                r = await http.post(f"{url}/offer", json={"session_id": f"cap{i}", "sdp": sdp})
                out.append((r.status_code, r.text))
            for i in range(n):
                await http.delete(f"{url}/sessions/cap{i}")
    finally:
        for c in clients:
            await c.close()
    return out


def test_session_cap_gives_503(simulator: Simulator) -> None:
    results = asyncio.run(_fill(simulator.url, 4))
    assert [s for s, _ in results] == [200, 200, 200, 503]
    assert "session cap reached (3 sessions)" in results[3][1]
    assert httpx.get(f"{simulator.url}/sessions", headers=SIMULATOR_AUTH).json() == []


def test_duplicate_session_id_is_refused(simulator: Simulator) -> None:
    async def twice() -> list[int]:
        from carom_client.video import VideoClient

        a, b = VideoClient(lambda f: None), VideoClient(lambda f: None)
        try:
            async with httpx.AsyncClient(timeout=20, headers=SIMULATOR_AUTH) as http:
                codes = []
                for c in (a, b):
                    body = {"session_id": "dup", "sdp": await c.offer()}
                    codes.append((await http.post(f"{simulator.url}/offer", json=body)).status_code)
                await http.delete(f"{simulator.url}/sessions/dup")
                return codes
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(twice()) == [200, 409]


def test_health_and_metrics(simulator: Simulator) -> None:
    h = httpx.get(f"{simulator.url}/health").json()
    assert h["status"] == "ok" and h["pulsar"] == "connected"
    httpx.post(
        f"{simulator.url}/offer",
        json={"session_id": "m1", "sdp": VP8_ONLY},
        headers=SIMULATOR_AUTH,
    )
    metrics = scrape(simulator.url)  # each sample present (get fails naming one that is not)
    metrics.get("carom_simulator_sessions")
    metrics.get("carom_simulator_truth_messages_total", outcome="acked")
    metrics.get("carom_simulator_sessions_events_total", event="rejected_codec")


def test_bad_config_stops_at_start() -> None:
    env = dict(os.environ, CAROM_SIMULATOR__HTTP__PROT="1")
    p = subprocess.run(
        [sys.executable, "-m", "carom_simulator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2
    assert "CAROM_SIMULATOR__HTTP__PROT" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "carom_simulator", "--max-sessions", "zero"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2 and "'max_sessions'" in p.stderr
