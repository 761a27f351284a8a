"""SessionManager in one process with a real aiortc client: parameters, teardown, bad offers."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from carom.signaling import OfferRequest, SessionParams
from carom_client.video import DecodedFrame, VideoClient
from carom_runtime.ice import set_host_addresses
from carom_simulator.config import SessionDefaults, SimulatorSettings
from carom_simulator.sessions import SessionError, SessionManager, resolve_params
from tests.services import wait_until_async


@pytest.fixture
def loopback() -> Iterator[None]:
    set_host_addresses(["127.0.0.1"])
    yield
    set_host_addresses(["auto"])


def test_resolve_params_fills_defaults() -> None:
    settings = SimulatorSettings(defaults=SessionDefaults(fps=60.0, gravity=980.0, seed=5))
    p = resolve_params(settings, SessionParams(cor=0.98, vx=10.0))
    assert (p.fps, p.gravity, p.cor, p.vx, p.vy, p.seed) == (60.0, 980.0, 0.98, 10.0, 1000.0, 5)
    assert resolve_params(SimulatorSettings(), SessionParams()).seed is not None


async def _one_session(manager: SessionManager, sid: str) -> int:
    frames: list[DecodedFrame] = []
    client = VideoClient(frames.append)
    answer = await manager.create(
        OfferRequest(session_id=sid, sdp=await client.offer(), params=SessionParams(fps=60))
    )
    await client.accept(answer.sdp)
    await wait_until_async(lambda: len(frames) >= 30, f"30 frames at {sid}", 5, every=0.05)
    assert [i.session_id for i in manager.info()] == [sid]
    assert await manager.close(sid)
    assert not await manager.close(sid)
    await client.close()
    assert len(manager) == 0
    return len(frames)


async def _settled(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Tasks started since ``before`` and still running, once there are none (5 s at most)."""

    def leftover() -> set[asyncio.Task[object]]:
        tasks = {t for t in asyncio.all_tasks() - before if not t.done()}
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
        return tasks

    # aiortc needs a moment to unwind its tasks after close()
    await wait_until_async(lambda: not leftover(), lambda: f"no task left: {leftover()}", 5)
    return leftover()


@pytest.mark.asyncio
async def test_session_teardown_leaves_no_task_or_thread(loopback: None) -> None:
    executor = ThreadPoolExecutor(2, thread_name_prefix="carom-frames")
    truths: list[tuple[object, ...]] = []
    manager = SessionManager(SimulatorSettings(), lambda *row: truths.append(row), executor)
    tasks_before = asyncio.all_tasks()
    # The first session warms up pools that live as long as the loop (the loop's default
    # executor, where aiortc encodes); after that, a session must leave nothing at all.
    assert await _one_session(manager, "warm-up") >= 30
    assert not await _settled(tasks_before)
    threads_before = {t for t in threading.enumerate() if t.is_alive()}

    assert await _one_session(manager, "s1") >= 30
    assert not await _settled(tasks_before)

    def extra() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t.is_alive()
            and t not in threads_before
            # The loop's default executor (where aiortc encodes) may add a worker on demand; it
            # belongs to the loop, is bounded by its max_workers and is not the session's.
            and not t.name.startswith("asyncio_")
            # Nor the service's frame executor, which also starts its workers on demand (seen in
            # CI: its second worker first appeared during the second session).
            and not t.name.startswith("carom-frames")
        ]

    await wait_until_async(lambda: not extra(), lambda: f"no thread left: {extra()}", 5)
    assert not extra(), extra()
    pool = [t for t in threading.enumerate() if t.name.startswith("asyncio_")]
    assert len(pool) <= min(32, (os.cpu_count() or 1) + 4)
    frames_pool = [t for t in threading.enumerate() if t.name.startswith("carom-frames")]
    assert len(frames_pool) <= 2  # bounded by its max_workers, whatever the sessions did
    assert manager.totals()["frames_sent"] >= 60 and len(truths) >= 60
    assert manager.counters["created"] == manager.counters["closed"] == 2
    executor.shutdown(wait=True)


@pytest.mark.asyncio
async def test_connect_timeout_frees_a_session_nobody_answers(loopback: None) -> None:
    executor = ThreadPoolExecutor(1)
    settings = SimulatorSettings(connect_timeout_s=0.5)
    manager = SessionManager(settings, lambda *row: None, executor)
    client = VideoClient(lambda f: None)
    await manager.create(OfferRequest(session_id="ghost", sdp=await client.offer()))
    await client.close()  # the browser goes away before connecting
    await wait_until_async(lambda: len(manager) == 0, "the session freed", timeout=4)
    assert len(manager) == 0
    executor.shutdown(wait=True)


@pytest.mark.asyncio
async def test_invalid_params_rejected_before_any_peer_connection(loopback: None) -> None:
    manager = SessionManager(
        SimulatorSettings(defaults=SessionDefaults(width=641)),
        lambda *row: None,
        ThreadPoolExecutor(1),
    )
    client = VideoClient(lambda f: None)
    try:
        with pytest.raises(SessionError) as info:
            await manager.create(OfferRequest(session_id="x", sdp=await client.offer()))
        assert info.value.status == 422 and "width" in info.value.detail
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_delete_while_the_answer_is_made_frees_the_slot_at_once(loopback: None) -> None:
    """The router's DELETE can come before the offer's session exists (it gave up on the relay):
    the answer is thrown away, instead of a session nobody will connect holding its slot."""
    executor = ThreadPoolExecutor(1)
    manager = SessionManager(SimulatorSettings(max_sessions=1), lambda *row: None, executor)
    client = VideoClient(lambda f: None)
    try:
        offer = OfferRequest(session_id="late", sdp=await client.offer())
        task = asyncio.create_task(manager.create(offer))
        # every=0: the loop only has to run the task up to its first await
        await wait_until_async(lambda: manager.pending, "the offer pending", timeout=5, every=0)
        assert manager.pending == 1
        with pytest.raises(SessionError):  # the slot is taken while the answer is made
            manager.check_capacity()
        assert await manager.close("late", reason="deleted")
        assert not await manager.close("other", reason="deleted")
        with pytest.raises(SessionError) as info:
            await task
        assert info.value.status == 410
        assert len(manager) == 0 and manager.pending == 0
        manager.check_capacity()  # the slot is free again
        assert manager.counters["deleted_pending"] == 1
        # The same id can be offered again afterwards (nothing of it is remembered).
        answer = await manager.create(OfferRequest(session_id="late", sdp=await client.offer()))
        assert answer.session_id == "late" and len(manager) == 1
        assert await manager.close("late")
    finally:
        await client.close()
        executor.shutdown(wait=True)
