"""Typed channels through the router as it runs (a subprocess) to the real broker: routes
reloaded under a live session (file change and SIGHUP), a bad routes file refused, refusals
(unknown type, over size, over rate, bad format, bad frames), a 6 MB points message chunked,
and each type's ``ChannelEnd`` after its last message.

No simulator: channel messages are taken from hello on, with or without video."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pulsar
import pytest
import yaml

from carom import channels as ch
from carom import protocol as p
from carom_client.channels import ChannelSender
from carom_client.session import RouterInfo
from carom_client.webtransport import ClientSession, ClientStream, WebTransportError, connect
from carom_local.pulsar import Broker
from carom_router.channel_io import CSV_COLUMNS
from carom_runtime.pulsar_io import quiet_logger
from tests.services import Running, free_port, scrape, service, wait_until, wait_until_async

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The router tells a client of refusals at most once a second (``Pacing.error_interval_s``).
ERROR_INTERVAL_S = 1.1


@dataclass
class Stack:
    router: Running
    routes_file: Path
    csv: Path
    tag: str
    broker: Broker

    def topic(self, name: str) -> str:
        return topic(self.tag, name)

    def write_routes(
        self, chat_topic: str = "chat-a", chat_rate: float = 1000, **extra: Any
    ) -> None:
        write_routes(self.routes_file, self.tag, chat_topic, chat_rate, **extra)

    def routes(self) -> dict[str, Any]:
        r = httpx.get(f"{self.router.url}/routes", timeout=5)
        assert r.status_code == 200
        body: dict[str, Any] = r.json()
        return body

    def wait_for_chat_topic(self, name: str) -> None:
        wait_until(
            lambda: self.routes()["routes"]["chat"]["topic"] == self.topic(name),
            lambda: f"chat routed to {name}: {self.routes()}",
            timeout=15,
        )


def topic(tag: str, name: str) -> str:
    # Same length for every name of one letter: a SIGHUP-only change keeps the file's size.
    return f"persistent://public/default/ch-{tag}-{name}"


def write_routes(
    path: Path, tag: str, chat_topic: str = "chat-a", chat_rate: float = 1000, **extra: Any
) -> None:
    routes = {
        "chat": {"topic": topic(tag, chat_topic), "format": "text",
                 "max_message_bytes": 4096, "max_rate": chat_rate, "burst": 1000,
                 "on_overflow": "refuse", **extra},
        "notes": {"topic": topic(tag, "notes"), "format": "text", "max_rate": 1, "burst": 2},
        "points": {"topic": topic(tag, "points"), "format": "points",
                   "max_message_bytes": 16 * 1024 * 1024, "max_rate": 10},
        "pose": {"topic": topic(tag, "pose"), "format": "bytes", "max_message_bytes": 512,
                 "max_rate": 1000, "datagrams": True},
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"version": 1, "routes": routes}))


@pytest.fixture(scope="module")
def stack(pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("channels")
    tag = uuid.uuid4().hex[:8]
    routes_file, csv = tmp / "routes.yaml", tmp / "channels.csv"
    write_routes(routes_file, tag)
    topics = {
        k: f"persistent://public/default/chs-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }
    args = [
        "--pulsar-url", pulsar_broker.service_url,
        *[a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)],
        "--webtransport-port", str(free_port(socket.SOCK_DGRAM)),
        "--simulator-url", f"http://127.0.0.1:{free_port()}",  # none: channels need no video
        "--channels-routes-file", str(routes_file),
        "--channels-metrics-csv", str(csv),
        "--channels-reload-poll-s", "0.2",
    ]  # fmt: skip
    with service("carom_router", args, free_port(), tmp / "router.log", healthy=False) as r:
        yield Stack(r, routes_file, csv, tag, pulsar_broker)


@dataclass
class Client:
    """A session that says hello and sends channels (no video): what a channel test needs."""

    wt: ClientSession
    control: ClientStream
    sender: ChannelSender
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[p.Error] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def read(self) -> None:
        reader = p.FrameReader()
        with contextlib.suppress(WebTransportError):
            async for chunk in self.control:
                for body in reader.feed(chunk):
                    msg = p.parse_router(body)
                    if isinstance(msg, p.Ping):  # answered, so the router knows our clock
                        pong = p.Pong(id=msg.id, t_client_ms=time.time_ns() / 1e6)
                        self.control.write(p.frame(pong))
                    elif isinstance(msg, p.Welcome):
                        self.welcomed.set()
                    elif isinstance(msg, p.Error):
                        self.errors.append(msg)

    def codes(self) -> list[str]:
        return [e.code for e in self.errors]

    async def bye(self) -> None:
        """Every channel stream acknowledged, then bye: the router closes the session."""
        assert await self.sender.finish(), "channel streams not acknowledged"
        self.control.write(p.frame(p.Bye()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.wt.closed), 10)
        if self.task is not None:
            self.task.cancel()
        with contextlib.suppress(Exception):
            await self.wt.close()


async def open_client(stack: Stack, sid: str) -> Client:
    info = await RouterInfo.fetch(stack.router.url)
    wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
    control = wt.open_stream()
    control.write(p.frame(p.Hello(session_id=sid, client="channel-test")))
    c = Client(wt, control, ChannelSender(wt))
    c.task = asyncio.get_running_loop().create_task(c.read())
    await asyncio.wait_for(c.welcomed.wait(), 10)
    # Channel capture times convert with the session's clock: wait for its first sample.
    await asyncio.sleep(0.2)
    return c


def records(
    broker: Broker,
    topic: str,
    sid: str,
    done: Callable[[list[ch.Record]], bool],
    timeout: float = 30.0,
) -> list[ch.Record]:
    """This session's records on ``topic`` from the start, once ``done`` says they are all in."""
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    out: list[ch.Record] = []
    try:
        reader = client.create_reader(topic, pulsar.MessageId.earliest)
        deadline = time.monotonic() + timeout
        while True:
            if reader.has_message_available():
                msg = reader.read_next(10_000)
                assert msg.partition_key()
                record = ch.decode_record(msg.data())
                assert msg.partition_key() == record.session_id
                if record.session_id == sid:
                    out.append(record)
            elif done(out) or time.monotonic() > deadline:
                return out
            else:
                time.sleep(0.05)
    finally:
        client.close()


def has_end(rs: list[ch.Record]) -> bool:
    return any(isinstance(r, ch.ChannelEnd) for r in rs)


def messages(rs: list[ch.Record]) -> list[ch.ChannelMessage]:
    return [r for r in rs if isinstance(r, ch.ChannelMessage)]


def the_end(rs: list[ch.Record]) -> ch.ChannelEnd:
    """The one ``ChannelEnd``, which must be the session's last record on the topic."""
    ends = [r for r in rs if isinstance(r, ch.ChannelEnd)]
    assert len(ends) == 1, rs
    assert rs[-1] is ends[0], "the end is not after the last message"
    return ends[0]


def test_routes_reload_on_file_change_and_sighup_keeps_the_session(stack: Stack) -> None:
    stack.write_routes("chat-a")
    stack.wait_for_chat_topic("chat-a")
    sid = f"rl-{uuid.uuid4().hex[:8]}"
    sent = 0

    async def run() -> Client:
        nonlocal sent
        c = await open_client(stack, sid)

        async def send_for(condition: Callable[[], bool]) -> None:
            nonlocal sent
            deadline = time.monotonic() + 20
            while not condition():
                assert time.monotonic() < deadline, stack.routes()
                c.sender.send("chat", f"message {sent}".encode())
                sent += 1
                await asyncio.sleep(0.02)

        def routed(name: str) -> Callable[[], bool]:
            return lambda: stack.routes()["routes"]["chat"]["topic"] == stack.topic(name)

        await send_for(lambda: sent >= 20)
        # 1. The file changes: a new topic (and rate), picked up by the poll.
        stack.write_routes("chat-b", chat_rate=500)
        await send_for(routed("chat-b"))
        await send_for(lambda: sent >= 60)  # more for the new topic
        # 2. SIGHUP alone: the file rewritten to the same size and mtime, so only the signal
        #    can make the router read it.
        before = stack.routes_file.stat()
        stack.write_routes("chat-c", chat_rate=500)
        assert stack.routes_file.stat().st_size == before.st_size
        os.utime(stack.routes_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        await asyncio.sleep(0.6)  # three polls: none sees a change
        assert stack.routes()["routes"]["chat"]["topic"] == stack.topic("chat-b")
        os.kill(stack.router.proc.pid, signal.SIGHUP)
        await send_for(routed("chat-c"))
        total = sent + 20
        await send_for(lambda: sent >= total)
        await c.bye()
        return c

    c = asyncio.run(run())
    assert c.errors == [], c.errors  # the session never noticed
    per_topic = {
        name: records(stack.broker, stack.topic(f"chat-{name}"), sid, has_end)
        for name in ("a", "b", "c")
    }
    seqs: list[int] = []
    for name, rs in per_topic.items():
        got = [m.seq for m in messages(rs)]
        assert got, f"nothing on chat-{name}"
        assert got == sorted(got), f"out of order on chat-{name}"
        seqs += got
        end = the_end(rs)  # every topic the type used has the end, after its messages
        assert (end.accepted, end.last_seq, end.refused) == (sent, sent - 1, 0)
        assert end.reason == "client said bye"
    # Each topic took the messages sent while its route was in force: in sequence, no gap,
    # nothing twice, across both reloads.
    assert seqs == list(range(sent))
    a, b, _ = (messages(per_topic[n]) for n in ("a", "b", "c"))
    assert a[-1].seq + 1 == b[0].seq
    assert b[0].payload == f"message {b[0].seq}".encode()
    m = scrape(stack.router.url)
    assert m.get("carom_router_routes_reloads_total", outcome="ok") >= 2
    assert m.get("carom_router_channel_messages_total", type="chat", outcome="published") >= sent
    assert "routes reloaded (signal)" in stack.router.text()
    assert "routes reloaded (changed)" in stack.router.text()


def test_a_bad_routes_file_is_refused_and_the_old_routes_kept(stack: Stack) -> None:
    stack.write_routes("chat-d")
    stack.wait_for_chat_topic("chat-d")
    sid = f"bad-{uuid.uuid4().hex[:8]}"
    refused_before = scrape(stack.router.url).get(
        "carom_router_routes_reloads_total", outcome="refused"
    )
    reasons: list[str] = []

    async def run() -> Client:
        c = await open_client(stack, sid)
        for n, (broken, why) in enumerate(
            [
                ("version: 1\nroutes: {chat: [unclosed\n", "not YAML"),
                (None, "routes.chat"),  # a bad field: the reason names the route
            ]
        ):
            if broken is None:
                stack.write_routes("chat-d", max_queue=-5)
            else:
                stack.routes_file.write_text(broken)

            def refused(why: str = why) -> bool:
                return why in (stack.routes()["last_error"] or "")

            await wait_until_async(refused, f"the bad file refused ({why})", timeout=15)
            reasons.append(stack.routes()["last_error"])
            # The routes in force are the old ones, and the session goes on with them.
            assert stack.routes()["routes"]["chat"]["topic"] == stack.topic("chat-d")
            for i in range(10):
                c.sender.send("chat", f"during bad file {n}: {i}".encode())
                await asyncio.sleep(0.01)
        stack.write_routes("chat-d")  # good again: the error clears
        await wait_until_async(lambda: stack.routes()["last_error"] is None, "error cleared")
        await c.bye()
        return c

    c = asyncio.run(run())
    assert c.errors == [], c.errors
    assert "not YAML" in reasons[0]
    assert "routes.chat" in reasons[1] and "max_queue" in reasons[1], reasons[1]
    rs = records(stack.broker, stack.topic("chat-d"), sid, has_end)
    assert [m.seq for m in messages(rs)] == list(range(20))
    end = the_end(rs)
    assert (end.accepted, end.last_seq) == (20, 19)
    m = scrape(stack.router.url)
    assert m.get("carom_router_routes_reloads_total", outcome="refused") >= refused_before + 2
    assert stack.router.text().count("routes file refused") >= 2


def test_refusals_are_told_counted_never_published_and_listed_in_the_end(stack: Stack) -> None:
    stack.write_routes("chat-e")
    stack.wait_for_chat_topic("chat-e")
    sid = f"ol-{uuid.uuid4().hex[:8]}"
    before = scrape(stack.router.url)

    def count(type_: str, outcome: str, m: Any = None) -> float:
        got: float = (m or scrape(stack.router.url)).get(
            "carom_router_channel_messages_total", 0.0, type=type_, outcome=outcome
        )
        return got

    async def run() -> Client:
        c = await open_client(stack, sid)

        async def told(code: str) -> None:
            await wait_until_async(lambda: code in c.codes(), f"{code} told: {c.codes()}", 10)
            await asyncio.sleep(ERROR_INTERVAL_S)  # the next refusal gets an error of its own

        c.sender.send("chat", b"ok 0")  # seq 0
        c.sender.send("telemetry", b"{}")  # no route
        await told("unknown_type")
        c.sender.send("chat", b"x" * 5000)  # seq 1: over 4096
        await told("over_limit")
        for i in range(3):  # notes: burst 2 at 1/s: the third is over the rate
            c.sender.send("notes", f"note {i}".encode())
        await told("rate")
        c.sender.send("points", b"\0" * 13, {"count": 1})  # not 12 bytes a point
        await told("bad_format")
        c.sender.send("chat", b"ok 2")  # seq 2
        c.sender.send_raw("junk", b"this is not a frame at all")
        await told("bad_frame")
        await c.bye()
        return c

    c = asyncio.run(run())
    assert c.codes() == ["unknown_type", "over_limit", "rate", "bad_format", "bad_frame"]
    for e in c.errors:
        assert not e.fatal and e.message, e
    chat = records(stack.broker, stack.topic("chat-e"), sid, has_end)
    assert [(m.seq, m.payload) for m in messages(chat)] == [(0, b"ok 0"), (2, b"ok 2")]
    end = the_end(chat)
    assert (end.accepted, end.last_seq, end.refused, end.refused_seqs) == (2, 2, 1, [1])
    notes = records(stack.broker, stack.topic("notes"), sid, has_end)
    assert [m.seq for m in messages(notes)] == [0, 1]
    end = the_end(notes)
    assert (end.accepted, end.last_seq, end.refused_seqs) == (2, 2, [2])
    points = records(stack.broker, stack.topic("points"), sid, has_end)
    assert messages(points) == []
    end = the_end(points)
    assert (end.accepted, end.last_seq, end.refused_seqs) == (0, 0, [0])
    after = scrape(stack.router.url)
    for type_, outcome in [
        ("unknown", "refused_unknown_type"),
        ("chat", "refused_over_limit"),
        ("notes", "refused_rate"),
        ("points", "refused_bad_format"),
    ]:
        assert count(type_, outcome, after) == count(type_, outcome, before) + 1, (type_, outcome)
    assert "telemetry" not in str(after.by("carom_router_channel_messages_total", "type"))


def test_a_6_mb_points_message_arrives_whole_through_chunking(stack: Stack) -> None:
    stack.write_routes("chat-f")
    stack.wait_for_chat_topic("chat-f")
    sid = f"pt-{uuid.uuid4().hex[:8]}"
    n = 500_000
    payload = b"".join(struct.pack("<3f", i, -i, 0.5) for i in range(0, n * 2, 2))
    assert len(payload) == 6_000_000
    small = struct.pack("<3f", 1, 2, 3)

    async def run() -> Client:
        c = await open_client(stack, sid)
        c.sender.send("points", small, {"count": 1})
        c.sender.send("points", payload, {"count": n})
        c.sender.send("points", small, {"count": 1})
        await c.bye()
        return c

    c = asyncio.run(run())
    assert c.errors == [], c.errors
    rs = records(stack.broker, stack.topic("points"), sid, has_end, timeout=60)
    got = messages(rs)
    assert [m.seq for m in got] == [0, 1, 2]
    big = got[1]
    assert big.payload == payload and ch.points_shape(big) == (n, 3)
    assert big.meta == {"count": n} and big.format == "points"
    assert big.t_capture_ns is not None and big.t_router_recv_ns <= big.t_published_ns
    end = the_end(rs)
    assert (end.accepted, end.last_seq, end.refused, end.failed_seqs) == (3, 2, 0, [])
    # The CSV's rows for points: its columns, and the bytes it carried.
    lines = stack.csv.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    wait_until(
        lambda: sum(
            float(r.split(",")[3]) for r in stack.csv.read_text().splitlines()[1:]
            if r.split(",")[1] == "points"
        ) >= len(payload),
        "the points' bytes in the CSV",
        timeout=10,
    )  # fmt: skip


def test_datagrams_for_routes_that_take_them(stack: Stack) -> None:
    """Every datagram that arrived is on the topic once, and the end counts exactly those."""
    stack.write_routes("chat-g")
    stack.wait_for_chat_topic("chat-g")
    sid = f"dg-{uuid.uuid4().hex[:8]}"
    n = 50

    async def run() -> Client:
        c = await open_client(stack, sid)
        for i in range(n):
            c.sender.send("pose", struct.pack("<7f", *([float(i)] * 7)), datagram=True)
            await asyncio.sleep(0.005)
        c.sender.send("chat", b"not as a datagram", datagram=True)  # its route says no
        await wait_until_async(lambda: "bad_format" in c.codes(), "bad_format told", 10)
        await asyncio.sleep(0.2)  # datagrams are not acknowledged: let the last ones land
        await c.bye()
        return c

    c = asyncio.run(run())
    assert c.sender.counters["datagrams_sent"] == n + 1
    rs = records(stack.broker, stack.topic("pose"), sid, has_end)
    got = [m.seq for m in messages(rs)]
    assert len(got) == len(set(got)) and set(got) <= set(range(n))
    assert len(got) >= n * 0.9, got  # loopback: next to none lost
    end = the_end(rs)
    assert end.accepted == len(got) and end.refused == 0
    assert messages(rs)[0].payload == struct.pack("<7f", *([float(got[0])] * 7))
    chat = records(stack.broker, stack.topic("chat-g"), sid, has_end)
    assert messages(chat) == []
    assert the_end(chat).refused_seqs == [0]
