"""The channels' shell (``carom_router.channel_io``) with a stand-in Pulsar client: the routes
file's reloads, the overflow policies, retries, the spool's order, ends after their messages.
(tests/router/test_channel_service.py runs it against the real broker.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pulsar
import pytest
import yaml

from carom import channels as ch
from carom import protocol as proto
from carom_router import channels as core
from carom_router.channel_io import ChannelHub, load_routes
from carom_router.config import ChannelSettings, RouterSettings
from carom_runtime.config import PulsarSettings


class FakeProducer:
    """Keeps what was sent; the test settles each one (``ack``) as the broker would."""

    def __init__(self, topic: str, kwargs: dict[str, Any]) -> None:
        self.topic = topic
        self.kwargs = kwargs
        self.sent: list[tuple[ch.Record, Callable[[pulsar.Result, object], None]]] = []
        self.closed = False

    def send_async(
        self, data: bytes, cb: Callable[[pulsar.Result, object], None], **_: Any
    ) -> None:
        self.sent.append((ch.decode_record(data), cb))

    def close(self) -> None:
        self.closed = True


class FakeClient:
    def __init__(self) -> None:
        self.producers: dict[str, list[FakeProducer]] = {}

    def create_producer(self, topic: str, **kwargs: Any) -> FakeProducer:
        p = FakeProducer(topic, kwargs)
        self.producers.setdefault(topic, []).append(p)
        return p


def route(**over: Any) -> dict[str, Any]:
    return {"topic": "persistent://public/default/t-chat", "format": "text", **over}


def write(path: Path, **chat: Any) -> None:
    path.write_text(yaml.safe_dump({"version": 1, "routes": {"chat": route(**chat)}}))


class Rig:
    def __init__(self, tmp: Path, **chat: Any) -> None:
        self.file = tmp / "routes.yaml"
        write(self.file, **chat)
        settings = RouterSettings(
            pulsar=PulsarSettings(spool_dir=str(tmp / "spool")),
            channels=ChannelSettings(routes_file=str(self.file), metrics_csv=""),
        )
        self.hub = ChannelHub(settings)
        self.client = FakeClient()
        self.session = self.hub.open_session("s1")
        self.told: list[core.ChannelAction] = []
        self.closed: list[str] = []

    # the Owner protocol (a Link)
    def channel_act(self, actions: list[core.ChannelAction]) -> None:
        self.told += actions

    def channel_close(self, code: str, message: str) -> None:
        self.closed.append(code)

    async def start(self) -> None:
        await self.hub.start(self.client)
        await self.settle()

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0.005)

    def producer(self, topic: str = "persistent://public/default/t-chat") -> FakeProducer:
        return self.client.producers[topic][-1]

    def send(self, seq: int, now: int = 10**18) -> list[core.ChannelAction]:
        frame = ch.encode_frame("chat", seq, 1.7e12, f"m{seq}".encode())
        actions = self.session.stream(2, frame, False, now, proto.ClockOffset())
        out: list[core.ChannelAction] = []
        for a in actions:
            if isinstance(a, core.PublishChannel):
                out += self.hub.publish(self.session, self, a)
            else:
                out.append(a)
        return out

    def close(self) -> None:
        self.hub.route_back(self.session, None, self.session.close("bye", 10**18))


def ack_all(p: FakeProducer, result: pulsar.Result = pulsar.Result.Ok) -> None:
    sent, p.sent = p.sent, []
    for _, cb in sent:
        cb(result, None)


def seqs(p: FakeProducer) -> list[object]:
    return [r.seq if isinstance(r, ch.ChannelMessage) else "end" for r, _ in p.sent]


def test_messages_then_the_end_in_order_and_restamped(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        await rig.start()
        p = rig.producer()
        assert p.kwargs["batching_enabled"] is False and p.kwargs["chunking_enabled"] is False
        for i in range(3):
            assert rig.send(i) == []
        rig.close()
        assert seqs(p) == [0, 1, 2]  # the end waits for them to settle
        first = p.sent[0][0]
        assert isinstance(first, ch.ChannelMessage) and first.t_published_ns != 10**18  # restamped
        ack_all(p)
        await rig.settle()
        assert seqs(p) == ["end"]
        end = p.sent[0][0]
        assert isinstance(end, ch.ChannelEnd) and (end.accepted, end.last_seq) == (3, 2)
        ack_all(p)
        await rig.settle()
        assert rig.session not in rig.hub.sessions  # done: let go of
        await rig.hub.stop(1)

    asyncio.run(run())


def test_chunking_for_routes_over_the_brokers_limit(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path, max_message_bytes=6 * 1024 * 1024, timeout_s=2.5)
        await rig.start()
        assert rig.producer().kwargs["chunking_enabled"] is True
        assert rig.producer().kwargs["send_timeout_millis"] == 2500
        await rig.hub.stop(1)

    asyncio.run(run())


def test_refuse_policy_tells_overflow_and_the_end_lists_it(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path, max_queue=2, on_overflow="refuse")
        await rig.start()
        assert rig.send(0) == [] and rig.send(1) == []
        (r,) = rig.send(2)
        assert isinstance(r, core.Refuse) and r.code == "overflow" and r.seq == 2
        ack_all(rig.producer())
        await rig.settle()
        assert rig.send(3) == []  # room again
        rig.close()
        ack_all(rig.producer())
        await rig.settle()
        (end, _), = rig.producer().sent  # fmt: skip
        assert isinstance(end, ch.ChannelEnd)
        assert (end.accepted, end.refused_seqs, end.last_seq) == (3, [2], 3)
        await rig.hub.stop(1)

    asyncio.run(run())


def test_close_policy_closes_the_session(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path, max_queue=1, on_overflow="close")
        await rig.start()
        rig.send(0)
        rig.send(1)
        assert rig.closed == ["overflow"]
        await rig.hub.stop(0.1)

    asyncio.run(run())


def test_spool_keeps_order_past_max_queue(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path, max_queue=2, on_overflow="spool")
        await rig.start()
        for i in range(6):
            assert rig.send(i) == []
        p = rig.producer()
        assert seqs(p) == [0, 1]
        out = rig.hub.outs["persistent://public/default/t-chat"]
        assert out.queued == 6 and len(out.spooled) == 4
        rig.close()  # the end goes behind the spooled messages
        got: list[object] = []
        for _ in range(10):
            got += seqs(p)
            ack_all(p)
            await rig.settle()
            if not p.sent:
                break
        assert got == [0, 1, 2, 3, 4, 5, "end"]
        await rig.hub.stop(1)

    asyncio.run(run())


def test_failed_publishes_are_retried_then_listed(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path, retries=2)
        await rig.start()
        p = rig.producer()
        rig.send(0)
        attempts = []
        for _ in range(3):
            (rec, _), = p.sent  # fmt: skip
            assert isinstance(rec, ch.ChannelMessage)
            attempts.append(rec.attempt)
            ack_all(p, pulsar.Result.Timeout)
            await rig.settle()
        assert attempts == [0, 1, 2]
        assert p.sent == []  # given up on
        rig.close()
        await rig.settle()
        (end, _), = p.sent  # fmt: skip
        assert isinstance(end, ch.ChannelEnd) and end.failed_seqs == [0] and end.accepted == 1
        stats = rig.hub.by_type["chat"].counters
        assert (stats["retried"], stats["failed"]) == (2, 1)
        await rig.hub.stop(0.1)

    asyncio.run(run())


def test_a_bad_reload_keeps_the_routes_and_says_why(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        await rig.start()
        rig.file.write_text("routes: {chat: [")
        assert not await rig.hub.reload()
        assert "not YAML" in (rig.hub.last_error or "")
        write(rig.file, max_rate=-1)
        assert not await rig.hub.reload()
        assert "routes.chat" in (rig.hub.last_error or "")
        assert rig.hub.describe()["reloads"] == {"refused": 2}
        assert rig.hub.routes.routes["chat"].max_rate == 100  # the old routes
        write(rig.file, topic="persistent://public/default/t-chat2")
        assert await rig.hub.reload()
        await rig.settle()
        assert rig.hub.last_error is None
        assert rig.session.routes.routes["chat"].topic.endswith("t-chat2")  # open sessions too
        assert "persistent://public/default/t-chat2" in rig.client.producers
        await rig.hub.stop(0.1)

    asyncio.run(run())


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nroutes:\n  Chat: {topic: x, format: text}\n")
    with pytest.raises(ch.ChannelError, match="type name"):
        load_routes(path)
    with pytest.raises(ch.ChannelError, match="cannot read"):
        load_routes(tmp_path / "none.yaml")
