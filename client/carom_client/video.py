"""The Python video client: receives a session's H.264 stream with aiortc and finds the ball.

It is Carom's headless stand-in for the page's video half: same offer shape (recvonly video,
complete ICE gathering, no trickle), same detector (``carom_client.centroid``: weighted V plane),
same frame identity (the RTP timestamp of each decoded frame).

aiortc's receiver rewrites each decoded frame's ``pts`` as the RTP timestamp minus the first one it
saw (unwrapped), and keeps that first timestamp in a private field of ``RTCRtpReceiver``
(aiortc 1.16, ``_RTCRtpReceiver__timestamp_mapper._origin``). The absolute RTP timestamp (what a
browser reads from ``VideoFrame.metadata().rtpTimestamp``) is therefore
``(pts + origin) mod 2**32``. aiortc is pinned; the integration tests fail if this stops holding,
because no frame would match its truth any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import av
import msgspec
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from carom.signaling import Answer, OfferRequest, SessionParams, auth_headers
from carom_client.centroid import centroid_v_plane
from carom_client.jitter import install as install_jitter_buffer
from carom_runtime.ice import strip_mdns_candidates

log = logging.getLogger(__name__)

#: How long ``VideoClient.close`` waits for aiortc's own close (about 0.1 s when it works).
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    """One decoded frame as the client saw it."""

    rtp_ts: int
    #: Wall clock (epoch ns) when the decoded frame reached the client.
    t_recv_ns: int
    #: Wall clock (epoch ns) when the centroid was computed.
    t_analysed_ns: int
    centroid: tuple[float, float] | None
    width: int
    height: int


def _rtp_origin(receiver: RTCRtpReceiver) -> int | None:
    mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
    origin = getattr(mapper, "_origin", None)
    return origin if isinstance(origin, int) else None


def analyse(frame: object) -> tuple[float, float] | None:
    """The ball's centre in a decoded ``av.VideoFrame`` (yuv420p), without copying planes."""
    plane = frame.planes[2]  # type: ignore[attr-defined]
    v = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    return centroid_v_plane(v)


Offerer = Callable[[str], Awaitable[str]]


@dataclass
class VideoClient:
    """A recvonly WebRTC peer: ``offer()`` -> send it somewhere -> ``accept(answer)`` -> frames."""

    on_frame: Callable[[DecodedFrame], None]
    pc: RTCPeerConnection = field(default_factory=RTCPeerConnection)
    frames: int = 0
    undecodable: int = 0
    codec: str | None = None
    _task: asyncio.Task[None] | None = None
    _receiver: RTCRtpReceiver | None = None

    async def offer(self) -> str:
        transceiver = self.pc.addTransceiver("video", direction="recvonly")
        self._receiver = transceiver.receiver
        install_jitter_buffer(self._receiver)  # frames complete on their marker bit, as browsers

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            self._task = asyncio.create_task(self._consume(track))

        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers all candidates
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        sdp, _ = strip_mdns_candidates(answer_sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        for line in sdp.splitlines():
            if line.startswith("a=rtpmap:") and "rtx/" not in line.lower():
                self.codec = line.split(" ", 1)[1].split("/", 1)[0].upper()
                break

    async def _consume(self, track: MediaStreamTrack) -> None:
        assert self._receiver is not None
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.VideoFrame):
                continue
            t_recv = time.time_ns()
            origin = _rtp_origin(self._receiver)
            if origin is None or frame.pts is None:
                self.undecodable += 1
                continue
            centre = analyse(frame)
            self.frames += 1
            self.on_frame(
                DecodedFrame(
                    rtp_ts=(int(frame.pts) + origin) % 2**32,
                    t_recv_ns=t_recv,
                    t_analysed_ns=time.time_ns(),
                    centroid=centre,
                    width=frame.width,
                    height=frame.height,
                )
            )

    async def close(self) -> None:
        """Close the peer connection, within ``CLOSE_TIMEOUT_S`` whatever state it is in.

        aiortc's ``close`` is not cancellation-safe: one cancelled midway leaves every later call
        waiting forever on the first one's future (seen when ``asyncio.run`` cancelled a test's
        tasks on a timeout: the run then hung in its own clean-up). Bounded, closing a client can
        never hang its caller."""
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("WebRTC close unfinished after %.0f s: left to aiortc", CLOSE_TIMEOUT_S)
        except asyncio.CancelledError:
            # Cancelling a task that waited on that future cancels the future itself: every
            # later close then raises this at once. Ours to raise only if we are the cancelled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.warning("WebRTC close: an earlier close was cancelled midway; left to aiortc")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def open_direct(
    simulator_url: str,
    session_id: str,
    on_frame: Callable[[DecodedFrame], None],
    params: Mapping[str, object] | None = None,
    timeout: float = 20.0,
    token: str = "",
) -> tuple[VideoClient, dict[str, object]]:
    """Negotiate straight with a simulator's ``POST /offer`` (no router); returns the answer.

    Speaks the contract (``carom.signaling``): ``params`` are checked as ``SessionParams`` before
    anything is sent, and the answer is decoded as an ``Answer``; either failing raises
    ``RuntimeError`` saying which, as a refused offer does. The answer is returned as plain data
    (``msgspec.to_builtins``), as the simulator sent it.

    ``token``: the simulator's shared secret (its session API answers only the router, or
    whoever holds that token, e.g. an operator with ``CAROM_SIMULATOR__ACCESS__TOKEN``).
    """
    import httpx

    try:
        wanted = msgspec.convert(params or {}, SessionParams)
    except msgspec.ValidationError as exc:
        raise RuntimeError(f"bad session params: {exc}") from None
    client = VideoClient(on_frame)
    headers = {**auth_headers(token), "Content-Type": "application/json"}
    try:
        offer = OfferRequest(session_id=session_id, sdp=await client.offer(), params=wanted)
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
            resp = await http.post(f"{simulator_url}/offer", content=msgspec.json.encode(offer))
        if resp.status_code != 200:
            raise RuntimeError(f"simulator refused the offer ({resp.status_code}): {resp.text}")
        try:
            answer = msgspec.json.decode(resp.content, type=Answer)
        except msgspec.DecodeError as exc:  # ValidationError too
            raise RuntimeError(f"simulator sent no valid answer: {exc}") from None
        await client.accept(answer.sdp)
    except BaseException:
        await client.close()
        raise
    return client, msgspec.to_builtins(answer)
