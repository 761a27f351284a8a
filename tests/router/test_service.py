"""The router as it runs: a subprocess with the real broker, the real simulator and the Python
WebTransport client speaking the page's protocol."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pulsar
import pytest

from carom import protocol as p
from carom import schemas
from carom.signaling import SessionParams
from carom_client.session import CaromSession, RouterInfo, SessionFailed
from carom_client.webtransport import WebTransportRefused, connect
from carom_local.pulsar import Broker
from carom_runtime.ice import set_host_addresses
from carom_runtime.pulsar_io import quiet_logger
from tests.services import Running, free_port, scrape, service, wait_until, wait_until_async

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    router: Running
    simulator: Running
    topics: dict[str, str]
    wt_port: int
    broker: Broker
    #: A second router instance on the same topics, side by side with the first.
    router2: Running


@pytest.fixture(scope="module")
def stack(pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    set_host_addresses(["127.0.0.1"])
    tag = uuid.uuid4().hex[:8]
    topics = {
        k: f"persistent://public/default/test-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }
    topic_args = [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    logs = tmp_path_factory.mktemp("stack")
    sim_port, http_port, wt_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    common = ["--pulsar-url", pulsar_broker.service_url, *topic_args]
    # tests.services gives the simulator its token and the router the same (by env).
    with service("carom_simulator", [*common, "--max-sessions", "8"], sim_port,
                 logs / "simulator.log") as sim:  # fmt: skip
        router_args = [
            *common,
            "--webtransport-port", str(wt_port),
            "--simulator-url", sim.url,
            "--limits-max-sessions", "6",
            "--limits-max-report-rate", "2000",
            "--limits-report-burst", "2000",
            "--limits-drain-timeout-s", "1",  # no tracker here: nobody ends a drain
        ]  # fmt: skip
        second = [*router_args]
        second[second.index("--webtransport-port") + 1] = str(free_port(socket.SOCK_DGRAM))
        # No tracker here: /health stays 503 (tracker never seen), so wait for any answer.
        with (
            service("carom_router", router_args, http_port, logs / "router.log",
                    healthy=False) as router,
            service("carom_router", second, free_port(), logs / "router2.log",
                    healthy=False) as router2,
        ):  # fmt: skip
            yield Stack(router, sim, topics, wt_port, pulsar_broker, router2)


def consume(
    broker: Broker,
    topic: str,
    done: Callable[[list[pulsar.Message]], bool] = lambda _: True,
    timeout: float = 15.0,
) -> list[pulsar.Message]:
    """Every message on ``topic`` from the start, once what is there satisfies ``done`` (the
    publishers may still be sending: then it waits for more, up to ``timeout``)."""
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    out: list[pulsar.Message] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if reader.has_message_available():
                out.append(reader.read_next(10_000))
            elif done(out) or time.monotonic() > deadline:
                return out
            else:
                time.sleep(0.05)
    finally:
        client.close()


async def open_session(
    stack: Stack, sid: str, router: Running | None = None, **params: float
) -> CaromSession:
    info = await RouterInfo.fetch((router or stack.router).url)
    s = CaromSession(info, sid, SessionParams(**params))  # type: ignore[arg-type]
    await s.open()
    return s


def test_config_and_health(stack: Stack) -> None:
    cfg = httpx.get(f"{stack.router.url}/config").json()
    assert cfg["webtransport_url"] == f"https://127.0.0.1:{stack.wt_port}/wt"
    assert len(bytes.fromhex(cfg["cert_sha256_hex"])) == 32
    r = httpx.get(f"{stack.router.url}/health")
    h = r.json()
    # No tracker in this stack: every part is named, and the answer is not 200.
    assert r.status_code == 503 and h["status"] == "degraded", h
    assert h["broker"] == {"state": "connected", "queued": 0, "outages": 0}
    assert h["simulator"] == {"state": "up"}
    assert h["tracker"]["state"] in ("never_seen", "silent") and h["sessions"] == 0


def test_tracker_silence_and_return_reach_clients_and_health(stack: Stack) -> None:
    """A tracker's status on the errors topic makes it up; silence after 3 intervals is told."""
    sid = f"st-{uuid.uuid4().hex[:8]}"

    async def run() -> CaromSession:
        s = await open_session(stack, sid, fps=10)
        client = pulsar.Client(stack.broker.service_url, logger=quiet_logger())
        producer = client.create_producer(stack.topics["errors"])
        try:
            # Said at hello: no tracker has been heard from (the router is older than 5 s).
            await wait_until_async(
                lambda: s.degraded.get("tracker"),
                lambda: f"the client told no tracker is heard from: {s.statuses}",
                timeout=10,
            )
            # A tracker announces itself, every 0.3 s (the sleep paces it): the client is told it
            # is up by the time the third is sent, and it is not silent yet.
            for _ in range(3):
                status = schemas.TrackerStatus(
                    tracker="test-tracker", t_ns=time.time_ns(), interval_ms=300
                )
                producer.send(schemas.encode(status), partition_key="test-tracker")
                await asyncio.sleep(0.3)
            assert "tracker" not in s.degraded, s.statuses
            h = httpx.get(f"{stack.router.url}/health").json()
            assert h["tracker"]["trackers"]["test-tracker"]["behind_ms"] == 0
            await wait_until_async(  # then falls silent: 3 intervals (0.9 s) later, clients hear
                lambda: "tracker" in s.degraded,
                lambda: f"the client told the tracker fell silent: {s.statuses}",
                timeout=5,
            )
        finally:
            client.close()
            await s.close()
        return s

    s = asyncio.run(run())
    told = [(st.state, st.part) for _, st in s.statuses]
    assert told == [("degraded", "tracker"), ("recovered", "tracker"), ("degraded", "tracker")]
    assert "test-tracker is back" in s.statuses[1][1].detail
    assert "for 0.9 s" in s.statuses[2][1].detail or "for 1.0 s" in s.statuses[2][1].detail


def test_end_carries_the_simulators_reason_when_it_stopped_the_video(stack: Stack) -> None:
    """SessionResults with a reason for an active session (no bye): the client learns why."""
    sid = f"sr-{uuid.uuid4().hex[:8]}"

    async def run() -> CaromSession:
        s = await open_session(stack, sid, fps=10)
        client = pulsar.Client(stack.broker.service_url, logger=quiet_logger())
        producer = client.create_producer(stack.topics["errors"])
        try:
            done = schemas.SessionResults(
                session_id=sid, frames_due=0, t_computed_ns=time.time_ns(), reason="peer failed"
            )
            producer.send(schemas.encode(done), partition_key=sid)
            await wait_until_async(lambda: s.end is not None, "the session's end", timeout=5)
        finally:
            client.close()
            await s.close()
        return s

    s = asyncio.run(run())
    assert s.end == p.End(complete=True, frames_due=0, reason="peer failed")


def test_session_reports_land_on_the_centroid_topic(stack: Stack) -> None:
    sid = f"r-{uuid.uuid4().hex[:8]}"

    async def run() -> CaromSession:
        s = await open_session(stack, sid, fps=30)
        # Kept: the session streams for 3 s; what that stretch produced (frames at the rate,
        # every one reported) is what the test checks.
        await asyncio.sleep(3.0)
        await s.close()
        return s

    s = asyncio.run(run())
    assert s.codec == "H264" and s.frames >= 60
    assert s.reports_sent + s.reports_not_sent == s.frames and s.reports_not_sent <= 1
    assert s.clock is not None and s.clock.rtt_ms < 50

    def of_sid(msgs: list[pulsar.Message]) -> list[pulsar.Message]:
        return [m for m in msgs if m.partition_key() == sid]

    msgs = consume(
        stack.broker, stack.topics["centroids"], lambda ms: len(of_sid(ms)) >= s.reports_sent
    )
    mine = [schemas.decode(m.data(), schemas.Centroid) for m in of_sid(msgs)]
    assert len(mine) == s.reports_sent
    # The simulator's truth comes separately: wait until it holds every reported frame's.
    reported = {c.rtp_ts for c in mine}

    def truth_of_all(ms: list[pulsar.Message]) -> bool:
        records = (schemas.decode_truth_topic(m.data()) for m in ms)
        return reported <= {
            t.rtp_ts for t in records if isinstance(t, schemas.Truth) and t.session_id == sid
        }

    truth_msgs = consume(stack.broker, stack.topics["truth"], truth_of_all)
    records = (schemas.decode_truth_topic(m.data()) for m in truth_msgs)
    truth = {t.rtp_ts: t for t in records if isinstance(t, schemas.Truth) and t.session_id == sid}
    for c in mine:
        assert c.session_id == sid and c.detected and c.rtp_ts in truth
        t = truth[c.rtp_ts]
        assert c.x is not None and c.y is not None and math.dist((c.x, c.y), (t.x, t.y)) < 0.5
        assert c.t_browser_recv_ns is not None and c.t_browser_analysed_ns is not None
        # Every hop in order on the one server clock (within the clock estimate's error).
        slack = 2_000_000
        assert t.t_render_ns <= c.t_browser_recv_ns + slack
        assert c.t_browser_recv_ns <= c.t_browser_analysed_ns + slack
        assert c.t_browser_analysed_ns <= c.t_router_recv_ns + slack
        assert c.t_router_recv_ns <= c.t_published_ns
    # The simulator session was deleted when the WebTransport session ended.
    auth = stack.simulator.headers
    listed: object = None

    def deleted() -> bool:
        nonlocal listed
        listed = httpx.get(f"{stack.simulator.url}/sessions", headers=auth).json()
        return listed == []

    wait_until(deleted, lambda: f"no simulator session left (listed: {listed})", timeout=5)


def test_errors_go_back_to_their_own_session_only(stack: Stack) -> None:
    # Two sessions on the first router, one on the second: each sees exactly its own results,
    # and neither router takes results from the other (each reads the topic on its own). Frames
    # 0-9 come one per message, 10-19 as one ``FrameResults`` per session (a tracker's commit).
    sids = [f"e-{uuid.uuid4().hex[:8]}" for _ in range(3)]

    async def run() -> list[CaromSession]:
        sessions = [
            await open_session(stack, sid, stack.router2 if i == 2 else None)
            for i, sid in enumerate(sids)
        ]
        client = pulsar.Client(stack.broker.service_url, logger=quiet_logger())
        producer = client.create_producer(stack.topics["errors"])

        def result(sid: str, i: int) -> schemas.FrameResult:
            return schemas.build(
                schemas.FrameResult, session_id=sid, frame=i, rtp_ts=1000 + i,
                status="ok", truth_x=10.0, truth_y=20.0, x=10.5, y=20.0, l2=0.5,
                t_render_ns=10**18, t_router_recv_ns=10**18 + 15 * 10**6,
                t_computed_ns=10**18 + 20 * 10**6,
            )  # fmt: skip

        try:
            for i in range(10):
                for sid in [*sids, "somebody-else"]:
                    producer.send(schemas.encode(result(sid, i)), partition_key=sid)
            for sid in [*sids, "somebody-else"]:
                several = schemas.FrameResults(
                    session_id=sid, results=[result(sid, i) for i in range(10, 20)]
                )
                producer.send(schemas.encode(several), partition_key=sid)
            await wait_until_async(
                lambda: all(len(s.live_errors) >= 20 for s in sessions),
                lambda: f"20 results at each session: {[len(s.live_errors) for s in sessions]}",
                timeout=5,
            )
        finally:
            client.close()
            for s in sessions:
                await s.close()
        return sessions

    sessions = asyncio.run(run())
    for s in sessions:
        assert [e.frame for e in s.live_errors] == list(range(20))
        assert all(e.l2 == 0.5 and e.render_to_router_ms == pytest.approx(15.0)
                   for e in s.live_errors)  # fmt: skip


def test_simulator_refusal_reaches_the_client(stack: Stack) -> None:
    async def run() -> None:
        info = await RouterInfo.fetch(stack.router.url)
        s = CaromSession(info, f"bad-{uuid.uuid4().hex[:6]}", SessionParams(width=100000))
        try:
            await s.open()
        finally:
            await s.close()

    with pytest.raises((SessionFailed, Exception)):
        asyncio.run(run())


def test_foreign_origin_is_refused(stack: Stack) -> None:
    async def run() -> None:
        info = await RouterInfo.fetch(stack.router.url)
        await connect(info.webtransport_url, cert_sha256=info.cert_sha256,
                      origin="https://evil.example")  # fmt: skip

    with pytest.raises(WebTransportRefused) as e:
        asyncio.run(run())
    assert e.value.status == 403


def test_duplicate_session_id_is_refused(stack: Stack) -> None:
    sid = f"d-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        a = await open_session(stack, sid)
        try:
            with pytest.raises(SessionFailed) as info:
                b = await open_session(stack, sid)
                await b.close()
            assert info.value.code == "session_exists"
        finally:
            await a.close()

    asyncio.run(run())


def _garbage(rng: random.Random, i: int) -> bytes:
    good = p.encode_report(i, i, (10.0, 10.0), 1.7e12, 1.7e12)
    kind = i % 8
    if kind == 0:
        return rng.randbytes(rng.randint(0, 200))  # random bytes
    if kind == 1:
        return good[: rng.randint(0, len(good) - 1)]  # truncated
    if kind == 2:
        return p.REPORT.pack(1, 1, 1, i, i, math.nan, 1.0, 1.7e12, 1.7e12)  # NaN
    if kind == 3:
        return p.REPORT.pack(1, 1, 1, i, i, 1e30, 1.0, 1.7e12, 1.7e12)  # huge
    if kind == 4:
        return b"\x02" + good[1:]  # wrong version
    if kind == 5:
        return good + b"\x00" * 20  # trailing bytes
    if kind == 6:
        return p.REPORT.pack(1, 1, 0xFF, i, i, 1.0, 1.0, 1.7e12, 1.7e12)  # unknown flags
    return p.REPORT.pack(1, 1, 1, i, i, 1.0, 1.0, -1.0, math.inf)  # bad times


def test_flood_of_bad_input_leaves_a_healthy_session_working(stack: Stack) -> None:
    healthy_sid = f"h-{uuid.uuid4().hex[:8]}"
    bad_sid = f"x-{uuid.uuid4().hex[:8]}"
    n_datagrams = 10_000
    before = scrape(stack.router.url).by("carom_router_reports_rejected_total", "reason")

    async def run() -> tuple[CaromSession, int]:
        healthy = await open_session(stack, healthy_sid, fps=30)
        info = await RouterInfo.fetch(stack.router.url)
        rng = random.Random(5)
        # An attacker session: hello, then 10,000 malformed datagrams and junk control messages.
        wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
        stream = wt.open_stream()
        stream.write(p.frame(p.Hello(session_id=bad_sid)))
        # The datagrams are this session's once the router has welcomed it.
        size = int.from_bytes(await asyncio.wait_for(stream.readexactly(4), 5), "big")
        welcome = p.parse_router(await asyncio.wait_for(stream.readexactly(size), 5))
        assert isinstance(welcome, p.Welcome), welcome
        frames_before = healthy.frames
        sent = 0
        for i in range(n_datagrams):
            data = _garbage(rng, i)
            for _ in range(1000):  # the client refuses while its congestion window is full;
                # the sleep paces the sender until there is room
                if wt.send_datagram(data):
                    sent += 1
                    break
                await asyncio.sleep(0.001)
            if i % 50 == 0:
                await asyncio.sleep(0)
            if i % 2000 == 0:  # junk control messages too, below limits.max_bad_messages
                junk = rng.choice([b"{}", b"not json", b'{"type":"offer"}', b"\xff" * 50,
                                   b'{"type":"pong","id":99,"t_client_ms":1}'])  # fmt: skip
                stream.write(struct.pack(">I", len(junk)) + junk)
            if i % 200 == 0:
                await asyncio.sleep(0.005)  # let the healthy session's frames interleave
        flood_end = time.monotonic()
        # "Sent" is queued at the client: closing now would drop what QUIC still holds.
        await wait_until_async(
            lambda: wt.datagrams_queued() == 0,
            lambda: f"the flood on the wire ({wt.datagrams_queued()} datagrams still queued)",
            timeout=10,
        )
        await wait_until_async(  # still receiving video meanwhile: 1.5 s after the flood, at most
            lambda: healthy.frames - frames_before >= 30,
            lambda: f"30 frames at the healthy session (got {healthy.frames - frames_before})",
            timeout=max(1.5 - (time.monotonic() - flood_end), 0.0),
        )
        await wt.close()
        await healthy.close()
        return healthy, sent

    healthy, sent = asyncio.run(run())
    assert sent == n_datagrams
    rejected: dict[str, float] = {}

    def counted() -> bool:
        nonlocal rejected
        after = scrape(stack.router.url).by("carom_router_reports_rejected_total", "reason")
        rejected = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return sum(rejected.values()) >= n_datagrams

    wait_until(counted, lambda: f"{n_datagrams} datagrams counted rejected: {rejected}", timeout=10)
    # Every malformed datagram that reached the router was rejected and counted under a reason;
    # on loopback none are lost, so the counts add up to what was sent.
    assert sum(rejected.values()) == n_datagrams, rejected
    for reason in ("truncated", "nan", "range", "version", "length", "flags", "time"):
        assert rejected.get(reason, 0) > 0, rejected
    # Nothing from the attacker reached the topic; everything there is valid.
    msgs = consume(stack.broker, stack.topics["centroids"])
    keys = {m.partition_key() for m in msgs}
    assert bad_sid not in keys
    for m in msgs:
        schemas.decode(m.data(), schemas.Centroid)  # raises if anything invalid got through
    mine = [m for m in msgs if m.partition_key() == healthy_sid]
    assert len(mine) == healthy.reports_sent > 0
    health = httpx.get(f"{stack.router.url}/health").json()
    assert health["broker"]["state"] == "connected" and health["simulator"]["state"] == "up"


def test_the_simulator_token_is_on_every_request() -> None:
    """Offers and DELETEs above only work with it (the stack's simulator requires it); here:
    the router's HTTP client carries it, and carries nothing without one."""
    from carom_router.config import RouterSettings, SimulatorLink
    from carom_router.router import Router

    token = "t0ken-of-at-least-16-chars"
    with_token = Router(RouterSettings(simulator=SimulatorLink(token=token)))
    assert with_token.http.headers["authorization"] == f"Bearer {token}"
    assert "authorization" not in Router(RouterSettings()).http.headers
    asyncio.run(with_token.http.aclose())


def test_session_limit(stack: Stack) -> None:
    async def run() -> list[int]:
        info = await RouterInfo.fetch(stack.router.url)
        opened, statuses = [], []
        try:
            for _ in range(8):
                try:
                    opened.append(
                        await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
                    )
                    statuses.append(200)
                except WebTransportRefused as exc:
                    statuses.append(exc.status)
        finally:
            for w in opened:
                await w.close()
        return statuses

    statuses = asyncio.run(run())
    assert statuses[:6] == [200] * 6 and set(statuses[6:]) == {503}


def test_bad_config_stops_the_router(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "carom_router", "--webtransport-cert-days", "30"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "webtransport.cert_days" in r.stderr
