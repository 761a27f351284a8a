"""A Carom session from Python, exactly as the page runs it (docs/protocol.md).

The protocol's state is ``carom_client.core.ClientCore`` (no I/O, unit-tested); this module is
its shell.

WebTransport to the router (control stream + datagrams), WebRTC video from the simulator
negotiated through the router, the ball found in every decoded frame and reported as a datagram,
live error results received back. Used by the tests, the load generator and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import msgspec

from carom import accounting
from carom import protocol as p
from carom.signaling import SessionControl, SessionParams, StreamState
from carom_client.core import Acked, Action, Answered, ClientCore, Reply
from carom_client.video import DecodedFrame, VideoClient
from carom_client.webtransport import ClientSession, ClientStream, WebTransportError, connect

log = logging.getLogger("carom.client")

#: How long ``CaromSession.control`` waits for its ack: the router's own wait for the simulator
#: (``simulator.timeout_s``, 15 s by default) and a margin; it always answers within that.
CONTROL_TIMEOUT_S = 20.0


class SessionFailed(RuntimeError):
    """The router or the simulator refused the session; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class RouterInfo:
    webtransport_url: str
    cert_sha256: bytes

    @classmethod
    async def fetch(cls, router_http: str) -> RouterInfo:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{router_http.rstrip('/')}/config")
            r.raise_for_status()
            cfg = r.json()
        return cls(cfg["webtransport_url"], bytes.fromhex(cfg["cert_sha256_hex"]))


@dataclass
class CaromSession:
    """The shell around a ``ClientCore``: the WebTransport session, the video and two tasks
    (control stream, datagrams). What the session learnt lives in ``core``; the attributes below
    read it."""

    info: RouterInfo
    session_id: str
    params: SessionParams = field(default_factory=SessionParams)
    on_error: Callable[[p.LiveResult], None] | None = None
    #: Called with every decoded frame after its report went out (e.g. to score it).
    on_frame: Callable[[DecodedFrame], None] | None = None
    origin: str | None = None
    frames: int = 0
    reports_sent: int = 0
    reports_not_sent: int = 0
    keep_live_errors: int = 100_000
    wt: ClientSession | None = None
    video: VideoClient | None = None
    #: Called with each ``status`` as it is read.
    on_status: Callable[[p.Status], None] | None = None
    core: ClientCore = field(init=False)
    _stream: ClientStream | None = None
    _answer: asyncio.Future[p.Answer] | None = None
    #: Controls sent and not yet acked, by id (one at a time is what the router takes).
    _acks: dict[int, asyncio.Future[p.ControlAck]] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _ended: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.core = ClientCore(self.session_id, self.params, keep_results=self.keep_live_errors)

    @property
    def live_errors(self) -> list[p.LiveResult]:
        return self.core.results

    @property
    def control_errors(self) -> list[p.Error]:
        return self.core.errors

    @property
    def counters(self) -> Counter[str]:
        return self.core.counters

    @property
    def codec(self) -> str | None:
        return None if self.core.answer is None else self.core.answer.codec

    @property
    def clock(self) -> p.ClockEstimate | None:
        return self.core.clock

    @property
    def end(self) -> p.End | None:
        """The router's last word (``close`` waits for it): how many frames were due, and, when
        the simulator stopped the video on its own, why (``end.reason``)."""
        return self.core.end

    @property
    def statuses(self) -> list[tuple[float, p.Status]]:
        """Every ``status`` the router sent, with the client's ``time.time()`` when it was read:
        a broker outage or a silent tracker (live results pause), then their recovery."""
        return self.core.statuses

    @property
    def degraded(self) -> dict[str, str]:
        """Parts the router last said were degraded, with its detail (empty: all well)."""
        return self.core.degraded

    @property
    def stream_state(self) -> StreamState:
        """Streaming or stopped, as the last control that took effect left it."""
        return self.core.stream_state

    @property
    def phase(self) -> int:
        """The phase in force (0 from the answer, one more at every change that took effect)."""
        return self.core.phase

    async def control(self, timeout: float = CONTROL_TIMEOUT_S, **fields: object) -> p.ControlAck:
        """Change the running session (``carom.signaling.SessionControl``'s fields: ``state``
        ``"stopped"`` or ``"streaming"``, ``fps``, ``width``, ``height``, ``bitrate``, ...) and
        return the router's ``control_ack``: ``ok`` with the phase and parameters now in force,
        or ``error`` saying why nothing changed (an invalid value names its field).

        Values are checked by the router, not here, so the ack is the one place that says what
        is valid; an unknown field name raises TypeError at once. One control at a time: the
        router refuses another before this one's ack (``busy``). Raises TimeoutError if no ack
        comes within ``timeout`` seconds, and ``SessionFailed`` if the session ends first.
        """
        change = SessionControl(**fields)  # type: ignore[arg-type]
        msg = self.core.live_control(change)
        ack: asyncio.Future[p.ControlAck] = asyncio.get_running_loop().create_future()
        self._acks[msg.id] = ack
        try:
            self._send(msg)
            return await asyncio.wait_for(ack, timeout)
        finally:
            self._acks.pop(msg.id, None)

    def send_stats(self, **fields: object) -> None:
        """Send a ``stats`` message (``carom.protocol.BrowserStats``'s fields: ``fps``,
        ``frames_received``, ``freeze_count``, ``freezes_ms``, ``bytes_received``, ``width``,
        ``height``, ...), as the page does every 2 s from getStats; the router publishes it as a
        ``ClientStats`` record on the centroid topic. Checked here: an invalid value raises
        ``msgspec.ValidationError`` rather than a bad message at the router."""
        self._send(msgspec.convert({"type": "stats", **fields}, p.BrowserStats))

    def coverage(self) -> accounting.Coverage | None:
        """The session's frames due and their fate, from the live results (None before ``end``)."""
        return self.core.coverage()

    async def open(self, timeout: float = 30.0) -> None:
        """Connect, say hello, negotiate the video; returns once the answer is applied."""
        loop = asyncio.get_running_loop()
        self.wt = await connect(
            self.info.webtransport_url, cert_sha256=self.info.cert_sha256, origin=self.origin
        )
        self._stream = self.wt.open_stream()
        self._answer = loop.create_future()
        self._tasks = [
            loop.create_task(self._control_loop()),
            loop.create_task(self._datagram_loop()),
        ]
        self._send(self.core.hello())
        self.video = VideoClient(self._on_frame)
        offer = await self.video.offer()
        with contextlib.suppress(WebTransportError):  # refused already: the answer says why
            self._send(p.Offer(sdp=offer))
        answer = await asyncio.wait_for(self._answer, timeout)
        await self.video.accept(answer.sdp)

    def _send(self, msg: p.ClientMessage) -> None:
        assert self._stream is not None
        self._stream.write(p.frame(msg))

    def _act(self, actions: list[Action]) -> None:
        assert self._answer is not None
        for a in actions:
            if isinstance(a, Reply):
                self._send(a.message)
            elif isinstance(a, Acked):
                waiting = self._acks.get(a.ack.id)
                if waiting is None or waiting.done():
                    self.core.counters["ack_unexpected"] += 1  # gave up on it (timeout)
                else:
                    waiting.set_result(a.ack)
            elif not self._answer.done():
                if isinstance(a, Answered):
                    self._answer.set_result(a.answer)
                else:
                    self._answer.set_exception(SessionFailed(a.code, a.message))

    async def _control_loop(self) -> None:
        assert self._stream is not None
        reader = p.FrameReader()
        try:
            async for chunk in self._stream:
                for body in reader.feed(chunk):
                    self._control(p.parse_router(body))
        except WebTransportError as exc:
            self._act(self.core.closed(str(exc)))
            return
        finally:
            self._ended.set()
            for waiting in self._acks.values():  # no ack can come now
                if not waiting.done():
                    waiting.set_exception(SessionFailed("closed", "the session ended"))
        self._act(self.core.closed())

    def _control(self, msg: p.RouterMessage) -> None:
        self._act(self.core.control(msg, time.time_ns() / 1e6, time.time()))
        if isinstance(msg, p.End):
            if msg.reason:
                log.warning("session %s: video stopped: %s", self.session_id, msg.reason)
            self._ended.set()
        elif isinstance(msg, p.Status):
            log.info("session %s: %s %s: %s", self.session_id, msg.part, msg.state, msg.detail)
            if self.on_status is not None:
                self.on_status(msg)

    async def _datagram_loop(self) -> None:
        assert self.wt is not None
        while True:
            try:
                data = await self.wt.receive_datagram()
            except WebTransportError:
                return
            live = self.core.result(data)
            if live is not None and self.on_error is not None:
                self.on_error(live)

    def _on_frame(self, f: DecodedFrame) -> None:
        self.frames += 1
        if self.wt is None:
            return
        data = self.core.report(f.rtp_ts, f.centroid, f.t_recv_ns / 1e6, f.t_analysed_ns / 1e6)
        if self.wt.send_datagram(data):
            self.reports_sent += 1
        else:
            self.reports_not_sent += 1
        if self.on_frame is not None:
            self.on_frame(f)

    async def close(self, drain_timeout: float = 15.0) -> None:
        """Say bye, keep watching until the router's ``end``, then close everything.

        The video keeps running while the simulator stops its stream, so frames rendered before
        it stopped are still reported; the router's ``end`` comes once the tracker has sent every
        frame due's result (docs/accounting.md). A router that never says it is waited for at
        most ``drain_timeout`` seconds.
        """
        if self._stream is not None and not self._ended.is_set():
            try:
                self._send(p.Bye())
            except Exception:  # already gone: nothing to wait for
                self._ended.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), drain_timeout)
            if self.core.end is not None:  # results are datagrams: the last may land after end
                for _ in range(25):
                    if self.core.results_in():
                        break
                    await asyncio.sleep(0.02)
        if self.video is not None:
            await self.video.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.wt is not None:
            with contextlib.suppress(Exception):
                await self.wt.close()
