"""The track's start-up grace: late first frames move the timeline instead of being skipped."""

from __future__ import annotations

import pytest

from carom_simulator.track import BallTrack
from tests.simulator.test_track import FPS, PARAMS, CountingExecutor, FakeMonotonic, Truths


@pytest.mark.asyncio
async def test_late_first_frames_are_sent_not_skipped() -> None:
    executor = CountingExecutor()
    mono = FakeMonotonic()
    track = BallTrack("grace", PARAMS, Truths(), executor=executor, monotonic=mono,
                      startup_grace_s=0.5)  # fmt: skip
    try:
        pts = [(await track.recv()).pts]
        for late in (2.5, 1.5, 2.0):  # a cold pipeline: each frame comes 1.5-2.5 intervals late
            mono.now += late / FPS
            pts.append((await track.recv()).pts)
        assert pts == [0, 1500, 3000, 4500]
        assert track.stats()["frames_late_dropped"] == 0
        for _ in range(26):  # frames 4..29 on time: the grace (30 frames = 0.5 s) is over
            mono.now += 1 / FPS
            await track.recv()
        mono.now += 61 / FPS  # after the grace a stall skips frames again
        assert (await track.recv()).pts == 1500 * 90
        assert track.stats()["frames_late_dropped"] == 60
    finally:
        track.stop()
        executor.shutdown(wait=True, cancel_futures=True)
