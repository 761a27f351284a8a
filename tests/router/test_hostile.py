"""Hostile clients against the router as it runs (a subprocess, default limits), with the real
broker and simulator: a flood of bad control frames, one address taking every slot it can, and
the router's memory after repeated rounds of both. A healthy session opened before the attacks,
from the attacker's own address, keeps its video and every report it sends; a client from
another address still gets in.

Measured before the limits (issue 14): 50,000 bad frames drew 50,000 error replies (6.9 MB) and
the session stayed open; 300 CONNECTs took 63 of 64 slots; RSS went 79 -> 138 MB and stayed.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pulsar
import pytest

from carom import protocol as p
from carom import schemas
from carom.signaling import SessionParams
from carom_client.session import CaromSession, RouterInfo
from carom_client.webtransport import ClientSession, WebTransportError, WebTransportRefused, connect
from carom_local.pulsar import Broker
from carom_router.config import LimitsSettings
from carom_runtime.ice import set_host_addresses
from carom_runtime.pulsar_io import quiet_logger
from tests.services import Running, free_port, scrape, service, wait_until, wait_until_async

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

LIMITS = LimitsSettings()  # the defaults: what a router runs with unless told otherwise
FLOOD_FRAMES = 50_000
CONNECTS = 40  # from one address: two and a half times what it may hold
ROUNDS = 2  # the second round shows the first one's slots came back
#: RSS after the attacks, against the baseline (allow the collector and the allocator a moment).
RSS_SLACK = 1.10
RSS_WAIT_S = 30.0


@dataclass
class Stack:
    router: Running
    topics: dict[str, str]
    broker: Broker


@pytest.fixture(scope="module")
def stack(pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    set_host_addresses(["127.0.0.1"])
    tag = uuid.uuid4().hex[:8]
    topics = {
        k: f"persistent://public/default/hostile-{k}-{tag}"
        for k in ("truth", "centroids", "errors")
    }
    common = ["--pulsar-url", pulsar_broker.service_url]
    common += [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    logs = tmp_path_factory.mktemp("hostile")
    # tests.services gives the simulator its token and the router the same (by env).
    with service("carom_simulator", common, free_port(), logs / "simulator.log") as sim:
        args = [*common, "--simulator-url", sim.url,
                "--webtransport-port", str(free_port(socket.SOCK_DGRAM))]  # fmt: skip
        # No tracker: /health is 503 (tracker never seen); any answer means it is up.
        with service("carom_router", args, free_port(), logs / "router.log", healthy=False) as r:
            yield Stack(r, topics, pulsar_broker)


def rss_mb(pid: int) -> float:
    """The process's resident set (VmRSS), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def metrics(stack: Stack) -> dict[str, float]:
    """The router's event counters by event name, its sessions gauge ("open") and its QUIC
    connections gauge ("connections")."""
    m = scrape(stack.router.url)
    return {
        **m.by("carom_router_events_total", "event"),
        "open": m.get("carom_router_sessions"),
        "connections": m.get("carom_router_quic_connections"),
    }


@dataclass
class Flood:
    session_id: str
    errors: list[p.Error]
    bytes_back: int
    closed: str


async def flood(info: RouterInfo, hello: bool) -> Flood:
    """50,000 five-byte bad frames in one write (after a hello, or instead of one)."""
    wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
    stream = wt.open_stream()
    sid = f"flood-{uuid.uuid4().hex[:8]}"
    head = p.frame(p.Hello(session_id=sid)) if hello else b""
    stream.write(head + b"\x00\x00\x00\x01x" * FLOOD_FRAMES)
    reader, errors, got = p.FrameReader(), [], 0
    try:
        async with asyncio.timeout(15):
            async for chunk in stream:
                got += len(chunk)
                msgs = [p.parse_router(b) for b in reader.feed(chunk)]
                errors += [m for m in msgs if isinstance(m, p.Error)]
            closed = await wt.wait_closed()
    except WebTransportError:
        closed = await wt.wait_closed()
    finally:
        await wt.close()
    return Flood(sid, errors, got, closed)


async def first_answer(info: RouterInfo, sid: str) -> p.RouterMessage:
    """What the router answers a hello with (welcome, or an error)."""
    async with await connect(info.webtransport_url, cert_sha256=info.cert_sha256) as wt:
        stream = wt.open_stream()
        stream.write(p.frame(p.Hello(session_id=sid)))
        reader = p.FrameReader()
        async with asyncio.timeout(5):
            async for chunk in stream:
                for body in reader.feed(chunk):
                    return p.parse_router(body)
    raise AssertionError("no answer to hello")


async def take_slots(info: RouterInfo) -> tuple[list[ClientSession], collections.Counter[str]]:
    """CONNECTS at once from one address; each one accepted says hello to keep its slot."""

    async def one(i: int) -> ClientSession | str:
        try:
            # The handshakes at once, both ends in Python: on a starved CI runner none of 300
            # finished in 4 s. Time is not what this checks; the bound is a hang's.
            wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256, timeout=60)
        except WebTransportRefused as exc:
            return str(exc.status)
        except (TimeoutError, WebTransportError):
            return "no answer"
        wt.open_stream().write(p.frame(p.Hello(session_id=f"slot-{i}-{uuid.uuid4().hex[:6]}")))
        return wt

    results = await asyncio.gather(*(one(i) for i in range(CONNECTS)))
    held = [r for r in results if isinstance(r, ClientSession)]
    return held, collections.Counter(r for r in results if isinstance(r, str))


def published(stack: Stack, sid: str, want: int) -> int:
    """Reports of ``sid`` on the centroid topic (waits up to 15 s for ``want`` of them)."""
    client = pulsar.Client(stack.broker.service_url, logger=quiet_logger())
    reader = client.create_reader(stack.topics["centroids"], pulsar.MessageId.earliest)
    n, deadline = 0, time.monotonic() + 15
    try:
        while n < want and time.monotonic() < deadline:
            try:
                msg = reader.read_next(200)
            except pulsar.Timeout:
                continue
            if msg.partition_key() == sid:
                schemas.decode(msg.data(), schemas.Centroid)
                n += 1
    finally:
        client.close()
    return n


@dataclass
class Outcome:
    healthy: CaromSession
    baseline_mb: float
    peak_mb: float
    after_mb: float
    frames_during: int
    floods: list[Flood]
    #: Per round: sessions the attacker held, its refusals by status, sessions open in all.
    rounds: list[tuple[int, collections.Counter[str], int]]
    newcomers: list[CaromSession]
    #: The router's answer to a hello reusing each flood session's id, after it was closed.
    reused: list[p.RouterMessage]


async def attack(stack: Stack, sid: str) -> Outcome:
    pid = stack.router.proc.pid
    info = await RouterInfo.fetch(stack.router.url)
    # The baseline is the router idle after one session has come and gone (the first one loads
    # what every session needs); the end, idle again after the attacks and the healthy session.
    warm = CaromSession(info, f"warm-{uuid.uuid4().hex[:6]}", SessionParams(fps=30))
    await warm.open()
    await asyncio.sleep(2.0)  # kept: the warm-up session streams a while
    await warm.close()
    # Kept: the router reclaims 2 s after the last close, and what it then holds is the baseline
    # (a measurement, not a condition to wait for).
    await asyncio.sleep(4.0)
    baseline = rss_mb(pid)
    # The healthy session comes from 127.0.0.1, the attacker's own address.
    healthy = CaromSession(info, sid, SessionParams(fps=30))
    await healthy.open()
    try:
        frames_before = healthy.frames
        floods: list[Flood] = []
        rounds: list[tuple[int, collections.Counter[str], int]] = []
        newcomers: list[CaromSession] = []
        v6 = RouterInfo(info.webtransport_url.replace("127.0.0.1", "[::1]"), info.cert_sha256)
        for i in range(ROUNDS):
            floods.append(await flood(info, hello=True))
            floods.append(await flood(info, hello=False))
            held, refused = await take_slots(info)
            open_now = int(metrics(stack)["open"])
            # Meanwhile a client from another address (::1) gets in, video and all.
            newcomer = CaromSession(v6, f"v6-{i}-{uuid.uuid4().hex[:6]}", SessionParams(fps=30))
            await newcomer.open()
            newcomers.append(newcomer)
            try:
                await wait_until_async(
                    lambda: newcomer.frames,  # noqa: B023 (awaited within this iteration)
                    "video at the client from ::1",
                    timeout=5,
                )
            finally:
                await newcomer.close()
            rounds.append((len(held), refused, open_now))
            await asyncio.gather(*(wt.close() for wt in held))
        frames_during = healthy.frames - frames_before
        peak = rss_mb(pid)
        # A session closed in the chunk that held its hello is forgotten, id and all.
        reused = [await first_answer(info, f.session_id) for f in floods[0::2]]
    finally:
        await healthy.close()
    # Memory: back to the baseline once the attacks are over (polled, bounded).
    after = rss_mb(pid)
    deadline = time.monotonic() + RSS_WAIT_S
    while after > baseline * RSS_SLACK and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        after = rss_mb(pid)
    return Outcome(healthy, baseline, peak, after, frames_during, floods, rounds, newcomers, reused)


def test_hostile_clients_are_bounded_and_the_others_keep_their_service(stack: Stack) -> None:
    sid = f"healthy-{uuid.uuid4().hex[:8]}"
    before = metrics(stack)
    got = asyncio.run(attack(stack, sid))
    counters = metrics(stack)
    print(
        f"\nfloods ({FLOOD_FRAMES} bad frames each): "
        + "; ".join(f"{len(f.errors)} errors, {f.bytes_back} bytes back" for f in got.floods)
        + f"\nslots ({CONNECTS} CONNECTs from 127.0.0.1 each round): "
        + "; ".join(f"{n} held ({o} open in all), refused {dict(r)}" for n, r, o in got.rounds)
        + f"\nrouter RSS: baseline {got.baseline_mb:.1f} MB, end of attacks {got.peak_mb:.1f} MB,"
        f" after {got.after_mb:.1f} MB; healthy session: {got.frames_during} frames during the"
        f" attacks, {got.healthy.reports_sent} reports sent"
    )

    # Floods: a handful of error replies, then the session is closed with code 2 (or at once,
    # without a hello); never one reply per bad frame.
    for f in got.floods[0::2]:
        assert 1 <= len(f.errors) <= 1 + 5 and f.bytes_back < 2_000, f
        assert f.errors[-1].fatal and f.errors[-1].code == "too_many_errors"
        assert f"code {p.CLOSE_TOO_MANY_ERRORS}" in f.closed
    assert all(isinstance(m, p.Welcome) for m in got.reused), got.reused
    for f in got.floods[1::2]:
        assert [e.code for e in f.errors] == ["expected_hello"] and f.errors[0].fatal
        assert f"code {p.CLOSE_PROTOCOL_ERROR}" in f.closed
    # Slots: one address holds at most max_sessions_per_address (the healthy session is one).
    for held, refused, open_now in got.rounds:
        assert held == LIMITS.max_sessions_per_address - 1, (held, refused)
        assert open_now == LIMITS.max_sessions_per_address < LIMITS.max_sessions
        assert held + sum(refused.values()) == CONNECTS and refused["429"] > 0, refused
    assert all(n.codec == "H264" and n.frames > 0 for n in got.newcomers)
    assert counters["refused_per_address"] > before.get("refused_per_address", 0)
    # The healthy session kept its video and every report it sent reached the topic.
    assert not got.healthy.control_errors, got.healthy.control_errors
    assert got.frames_during >= 30
    sent = got.healthy.reports_sent
    assert sent > 0 and published(stack, sid, sent) == sent
    # Nothing of the attacks is kept: no session, no connection (they end within seconds).
    wait_until(
        lambda: metrics(stack)["connections"] == 0,
        lambda: f"every QUIC connection closed: {metrics(stack)}",
        timeout=10,
    )
    assert metrics(stack)["connections"] == 0 and metrics(stack)["open"] == 0
    # Memory came back.
    assert got.after_mb <= got.baseline_mb * RSS_SLACK
    assert "Traceback" not in stack.router.text()
