"""Live control end to end: a Python client's ``control`` through a real router to the real
simulator's ``PATCH /sessions/{id}``, with the real broker; and the stats a client sends, on the
centroid topic as ``ClientStats``."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from carom import protocol as p
from carom import schemas
from carom.signaling import SessionControl, SessionParams
from carom_client.session import CaromSession, RouterInfo
from carom_client.webtransport import connect
from carom_local.pulsar import Broker
from carom_runtime.ice import set_host_addresses
from tests.router.test_service import consume
from tests.services import Running, free_port, scrape, service, wait_until_async

pytestmark = pytest.mark.integration

#: The stack's live control limit: low, so that a test reaches it in a second.
LIVE_RATE, LIVE_BURST = 2, 4


@dataclass
class Stack:
    router: Running
    simulator: Running
    topics: dict[str, str]
    broker: Broker


@pytest.fixture(scope="module")
def stack(pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    set_host_addresses(["127.0.0.1"])
    tag = uuid.uuid4().hex[:8]
    topics = {
        k: f"persistent://public/default/ctl-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }
    common = ["--pulsar-url", pulsar_broker.service_url]
    common += [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    logs = tmp_path_factory.mktemp("control")
    # tests.services gives the simulator its token and the router the same (by env).
    with service("carom_simulator", common, free_port(), logs / "simulator.log") as sim:
        args = [
            *common,
            "--webtransport-port", str(free_port(socket.SOCK_DGRAM)),
            "--simulator-url", sim.url,
            "--limits-max-live-control-rate", str(LIVE_RATE),
            "--limits-live-control-burst", str(LIVE_BURST),
            "--limits-drain-timeout-s", "1",  # no tracker here: nobody ends a drain
        ]  # fmt: skip
        # No tracker: /health stays 503 (tracker never seen), so wait for any answer.
        with service("carom_router", args, free_port(), logs / "router.log", healthy=False) as r:
            yield Stack(r, sim, topics, pulsar_broker)


async def open_session(stack: Stack, prefix: str, **params: float) -> CaromSession:
    info = await RouterInfo.fetch(stack.router.url)
    s = CaromSession(info, f"{prefix}-{uuid.uuid4().hex[:8]}", SessionParams(**params))  # type: ignore[arg-type]
    await s.open()
    await wait_until_async(lambda: s.frames >= 5, lambda: f"video ({s.frames} frames)", 15)
    return s


async def frames_in(s: CaromSession, seconds: float) -> int:
    before = s.frames
    await asyncio.sleep(seconds)
    return s.frames - before


def controls(stack: Stack) -> dict[str, float]:
    return scrape(stack.router.url).by("carom_router_controls_total", "outcome")


def test_stop_resume_and_a_new_frame_rate_are_acked_and_take_effect(stack: Stack) -> None:
    before = controls(stack)

    async def run() -> tuple[CaromSession, list[p.ControlAck], int, int, int]:
        s = await open_session(stack, "ctl", fps=30)
        try:
            stop = await s.control(state="stopped")
            await asyncio.sleep(0.5)  # frames already sent land
            stopped = await frames_in(s, 1.0)
            resume = await s.control(state="streaming")
            await wait_until_async(lambda: s.frames > 0, "frames again", 5)
            slow = await s.control(fps=10)
            await asyncio.sleep(0.5)
            at_10 = await frames_in(s, 2.0)
            fast = await s.control(fps=30, vx=-400.0)
            await asyncio.sleep(0.5)
            at_30 = await frames_in(s, 2.0)
        finally:
            await s.close()
        return s, [stop, resume, slow, fast], stopped, at_10, at_30

    s, acks, stopped, at_10, at_30 = asyncio.run(run())
    stop, resume, slow, fast = acks
    assert [a.id for a in acks] == [0, 1, 2, 3] and all(a.ok and not a.error for a in acks), acks
    assert (stop.state, resume.state, slow.state) == ("stopped", "streaming", "streaming")
    # Each change a phase of its own, in order.
    phases = [a.phase for a in acks if a.phase is not None]
    assert len(phases) == 4 and phases == sorted(set(phases)), acks
    assert slow.params is not None and slow.params.fps == 10
    assert fast.params is not None and (fast.params.fps, fast.params.vx) == (30, -400)
    assert (s.phase, s.stream_state) == (fast.phase, "streaming")
    # In force: no frame while stopped; at 10 fps a third of 30 (2 s of each: 20 and 60; the
    # bounds leave room for a slow machine, and never let 30 pass for 10).
    assert stopped <= 2, stopped
    assert at_10 <= 26 and at_30 > at_10 + 10, (at_10, at_30)
    after = controls(stack)
    assert after.get("ok", 0) - before.get("ok", 0) == 4, after
    # The frames say which phase they were sent in (the simulator's truth).
    truth = [
        t for t in (schemas.decode_truth_topic(m.data())
                    for m in consume(stack.broker, stack.topics["truth"]))
        if isinstance(t, schemas.Truth) and t.session_id == s.session_id
    ]  # fmt: skip
    assert {slow.phase, fast.phase} <= {t.phase for t in truth}, {t.phase for t in truth}


def test_refusals_are_acked_with_the_reason_and_change_nothing(stack: Stack) -> None:
    async def run() -> tuple[dict[str, p.ControlAck], list[p.ControlAck]]:
        s = await open_session(stack, "ref", fps=30)
        try:
            got = {
                # Refused by the router (the contract's range), naming the field.
                "fps": await s.control(fps=500),
                "width": await s.control(width=641),
                # Refused by the simulator (the ball of radius 20 does not fit), its detail
                # passed on.
                "size": await s.control(width=32),
            }
            # Two at once: the second arrives while the first is at the simulator.
            both = await asyncio.gather(s.control(fps=20), s.control(fps=25))
            await asyncio.sleep(1.0)  # the live control budget refills
            got["after"] = await s.control(gravity=980.0)
        finally:
            await s.close()
        return got, list(both)

    got, both = asyncio.run(run())
    for key in ("fps", "width", "size"):
        ack = got[key]
        assert not ack.ok and ack.phase is None and ack.state is None, ack
    assert got["fps"].error.startswith("fps: ") and "240" in got["fps"].error
    assert got["width"].error.startswith("width: ") and "multiple of 2" in got["width"].error
    assert "width" in got["size"].error and "radius" in got["size"].error, got["size"]
    first, second = both
    assert first.ok and first.params is not None and first.params.fps == 20, first
    assert not second.ok and second.error.startswith("busy"), second
    # Nothing the refusals asked for is in force; the next control works.
    after = got["after"]
    assert after.ok and after.params is not None, after
    assert (after.params.fps, after.params.gravity) == (20, 980), after.params
    assert after.params.width == 640, after.params


def test_a_control_before_the_answer_is_refused_no_stream_yet(stack: Stack) -> None:
    async def run() -> p.RouterMessage:
        info = await RouterInfo.fetch(stack.router.url)
        wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
        try:
            stream = wt.open_stream()
            stream.write(p.frame(p.Hello(session_id=f"early-{uuid.uuid4().hex[:8]}")))
            stream.write(p.frame(p.Control(id=7, set=SessionControl(state="stopped"))))
            reader = p.FrameReader()
            while True:
                chunk = await asyncio.wait_for(stream.read(65536), 5)
                for body in reader.feed(chunk):
                    msg = p.parse_router(body)
                    if isinstance(msg, p.ControlAck | p.Error):
                        return msg
        finally:
            await wt.close()

    ack = asyncio.run(run())
    assert isinstance(ack, p.ControlAck) and ack.id == 7 and not ack.ok, ack
    assert ack.error.startswith("no stream yet"), ack


def test_a_client_flooding_controls_reaches_the_simulator_at_the_limit_only(stack: Stack) -> None:
    """One client sends controls 40 times a second, then 500 at once; another, beside it, is
    served as usual. The simulator sees the first client's at the live control rate; the rest
    are refused, and the burst closes its session (over the rate of all control messages)."""
    before = controls(stack)

    async def run() -> tuple[list[p.ControlAck], CaromSession, float, dict[str, float]]:
        flooder = await open_session(stack, "flood", fps=30)
        calm = await open_session(stack, "calm", fps=30)
        try:
            start, acks = time.monotonic(), list[p.ControlAck]()
            # 40 controls, 25 ms apart at most: below limits.max_control_rate (50/s). A count,
            # not 1.5 s of them: each waits for its ack, and a loaded runner sent only 25 in 1.5 s.
            while len(acks) < 40:
                acks.append(await flooder.control(vx=float(100 + len(acks))))
                await asyncio.sleep(0.025)
            elapsed = time.monotonic() - start
            paced = controls(stack)
            assert flooder._stream is not None
            flood = p.frame(p.Control(id=10_000, set=SessionControl(fps=12)))
            flooder._stream.write(flood * 500)
            await wait_until_async(
                lambda: any(e.code == "too_many_errors" for e in flooder.control_errors),
                lambda: f"the flooder closed: {flooder.control_errors[-3:]}",
                timeout=5,
            )
            frames_before = calm.frames
            await asyncio.sleep(1.0)
            calm_frames = calm.frames - frames_before
            # Its own budget, untouched by the flood; its video went on meanwhile.
            calm_ack = await calm.control(fps=24)
            assert calm_ack.ok and calm_ack.params is not None, calm_ack
            assert calm_ack.params.fps == 24 and calm_frames >= 10, (calm_ack, calm_frames)
        finally:
            await flooder.close()
            await calm.close()
        return acks, flooder, elapsed, paced

    acks, flooder, elapsed, paced = asyncio.run(run())
    ok = [a for a in acks if a.ok]
    refused = [a for a in acks if not a.ok]
    # The burst, then the rate over the time it ran (+1 for a token refilled at the edge).
    assert LIVE_BURST <= len(ok) <= LIVE_BURST + LIVE_RATE * elapsed + 1, (len(ok), elapsed)
    assert len(refused) > 20 and all(a.error.startswith("rate") for a in refused), refused[:3]
    assert paced.get("rate", 0) - before.get("rate", 0) == len(refused), paced
    # The burst of 500: at most one more reached the simulator (its budget was spent), the
    # rest were refused or never read; the session was closed for it.
    after = controls(stack)
    assert after.get("ok", 0) - paced.get("ok", 0) <= 2, after  # the calm one's, and one
    fatal = [e for e in flooder.control_errors if e.fatal]
    assert [e.code for e in fatal] == ["too_many_errors"], flooder.control_errors


def test_stats_land_on_the_centroid_topic_beside_the_reports(stack: Stack) -> None:
    async def run() -> CaromSession:
        s = await open_session(stack, "stats", fps=30)
        try:
            s.send_stats(
                fps=29.5, frames_received=120, frames_decoded=118, freeze_count=1,
                freezes_ms=212.5, bytes_received=345_678, width=640, height=480, codec="H264",
            )  # fmt: skip
            s.send_stats()  # every field optional
            await asyncio.sleep(0.5)
        finally:
            await s.close()
        return s

    t0 = time.time_ns()
    s = asyncio.run(run())

    def of_sid(msgs: Sequence[object]) -> list[schemas.ClientStats]:
        return [m for m in msgs if isinstance(m, schemas.ClientStats)
                and m.session_id == s.session_id]  # fmt: skip

    records = [
        schemas.decode_centroid_topic(m.data())
        for m in consume(
            stack.broker,
            stack.topics["centroids"],
            lambda ms: len(of_sid([schemas.decode_centroid_topic(m.data()) for m in ms])) >= 2,
        )
    ]
    full, empty = of_sid(records)
    assert full == schemas.ClientStats(
        session_id=s.session_id, t_router_recv_ns=full.t_router_recv_ns, fps=29.5,
        frames_received=120, frames_decoded=118, freeze_count=1, freezes_ms=212.5,
        bytes_received=345_678, width=640, height=480, codec="H264",
    )  # fmt: skip
    assert t0 < full.t_router_recv_ns < time.time_ns()
    assert empty.fps is None and empty.width is None
    # The same topic, the same key, as the session's reports.
    assert any(isinstance(m, schemas.Centroid) and m.session_id == s.session_id for m in records)
