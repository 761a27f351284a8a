"""``VideoClient.close`` never hangs its caller, whatever state aiortc's close was left in.

aiortc's ``RTCPeerConnection.close`` keeps a future that a second call awaits; a first call
cancelled midway (as ``asyncio.run`` cancels every task of an interrupted run) never resolves
it, so every later close hung: a test run hung in its own clean-up that way."""

from __future__ import annotations

import asyncio
import time

import pytest

from carom_client import video
from carom_client.video import VideoClient


async def _cancelled_midway(monkeypatch: pytest.MonkeyPatch) -> VideoClient:
    monkeypatch.setattr(video, "CLOSE_TIMEOUT_S", 0.5)
    client = VideoClient(on_frame=lambda _: None)
    await client.offer()
    first = asyncio.create_task(client.pc.close())
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    return client


@pytest.mark.asyncio
async def test_close_after_a_cancelled_close_returns_within_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await _cancelled_midway(monkeypatch)
    t0 = time.monotonic()
    await asyncio.wait_for(client.close(), 5.0)  # unbounded, this waited forever
    assert time.monotonic() - t0 < 2.0


@pytest.mark.asyncio
async def test_close_after_a_cancelled_waiter_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    client = await _cancelled_midway(monkeypatch)
    # A second close, itself cancelled: that cancels aiortc's shared future, and every later
    # close raised CancelledError at once, in a task nobody cancelled.
    waiter = asyncio.create_task(client.pc.close())
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(client.close(), 5.0)
