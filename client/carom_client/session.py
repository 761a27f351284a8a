"""A Carom session from Python, exactly as the page runs it (docs/protocol.md).

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

from carom import accounting
from carom import protocol as p
from carom.signaling import SessionParams
from carom_client.video import DecodedFrame, VideoClient
from carom_client.webtransport import ClientSession, ClientStream, WebTransportError, connect

log = logging.getLogger("carom.client")


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
    live_errors: list[p.LiveResult] = field(default_factory=list)
    keep_live_errors: int = 100_000
    control_errors: list[p.Error] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    codec: str | None = None
    clock: p.ClockEstimate | None = None
    wt: ClientSession | None = None
    video: VideoClient | None = None
    _stream: ClientStream | None = None
    _answer: asyncio.Future[p.Answer] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _seq: int = 0
    #: The router's last word (``close`` waits for it): how many frames were due, and, when the
    #: simulator stopped the video on its own, why (``end.reason``).
    end: p.End | None = None
    #: Every ``status`` the router sent, with the client's ``time.time()`` when it was read: a
    #: broker outage or a silent tracker (live results pause), then their recovery.
    statuses: list[tuple[float, p.Status]] = field(default_factory=list)
    #: Called with each ``status`` as it is read.
    on_status: Callable[[p.Status], None] | None = None
    _ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def degraded(self) -> dict[str, str]:
        """Parts the router last said were degraded, with its detail (empty: all well)."""
        now: dict[str, str] = {}
        for _, status in self.statuses:
            if status.state == "degraded":
                now[status.part] = status.detail
            else:
                now.pop(status.part, None)
        return now

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
        self._send(p.Hello(session_id=self.session_id, params=self.params, client="carom-py"))
        self.video = VideoClient(self._on_frame)
        offer = await self.video.offer()
        with contextlib.suppress(WebTransportError):  # refused already: the answer says why
            self._send(p.Offer(sdp=offer))
        answer = await asyncio.wait_for(self._answer, timeout)
        self.codec = answer.codec
        await self.video.accept(answer.sdp)

    def _send(self, msg: p.ClientMessage) -> None:
        assert self._stream is not None
        self._stream.write(p.frame(msg))

    async def _control_loop(self) -> None:
        assert self._stream is not None and self._answer is not None
        reader = p.FrameReader()
        try:
            await self._read_control(reader)
        except WebTransportError as exc:
            if not self._answer.done():
                self._answer.set_exception(SessionFailed("closed", str(exc)))
            return
        finally:
            self._ended.set()
        if not self._answer.done():
            self._answer.set_exception(SessionFailed("closed", "the router closed the session"))

    async def _read_control(self, reader: p.FrameReader) -> None:
        assert self._stream is not None and self._answer is not None
        async for chunk in self._stream:
            for body in reader.feed(chunk):
                msg = p.parse_router(body)
                self.counters[f"control_{type(msg).__name__.lower()}"] += 1
                if isinstance(msg, p.Ping):
                    self._send(p.Pong(id=msg.id, t_client_ms=time.time_ns() / 1e6))
                elif isinstance(msg, p.Answer):
                    if not self._answer.done():
                        self._answer.set_result(msg)
                elif isinstance(msg, p.ClockEstimate):
                    self.clock = msg
                elif isinstance(msg, p.End):
                    self.end = msg
                    if msg.reason:
                        log.warning("session %s: video stopped: %s", self.session_id, msg.reason)
                    self._ended.set()
                elif isinstance(msg, p.Status):
                    self.statuses.append((time.time(), msg))
                    log.info("session %s: %s %s: %s", self.session_id, msg.part, msg.state,
                             msg.detail)  # fmt: skip
                    if self.on_status is not None:
                        self.on_status(msg)
                elif isinstance(msg, p.Error):
                    self.control_errors.append(msg)
                    if not self._answer.done():
                        self._answer.set_exception(SessionFailed(msg.code, msg.message))

    async def _datagram_loop(self) -> None:
        assert self.wt is not None
        while True:
            try:
                data = await self.wt.receive_datagram()
            except WebTransportError:
                return
            try:
                err = p.decode_result(data)
            except p.ProtocolError:
                self.counters["bad_datagrams"] += 1
                continue
            if len(self.live_errors) < self.keep_live_errors:
                self.live_errors.append(err)
            if self.on_error is not None:
                self.on_error(err)

    def _on_frame(self, f: DecodedFrame) -> None:
        self.frames += 1
        if self.wt is None:
            return
        data = p.encode_report(
            self._seq, f.rtp_ts, f.centroid, f.t_recv_ns / 1e6, f.t_analysed_ns / 1e6
        )
        self._seq += 1
        if self.wt.send_datagram(data):
            self.reports_sent += 1
        else:
            self.reports_not_sent += 1
        if self.on_frame is not None:
            self.on_frame(f)

    def coverage(self) -> accounting.Coverage | None:
        """The session's frames due and their fate, from the live results (None before ``end``).

        Defined as the tracker's report defines it (``carom.accounting``), so the two agree when
        no result datagram was lost; a lost one shows as "no row".
        """
        if self.end is None or self.end.frames_due is None:
            return None
        by_frame = {e.frame: e.status for e in self.live_errors}
        return accounting.count(
            ((f, s) for f, s in by_frame.items() if s != "orphan"),  # type: ignore[misc]
            self.end.frames_due,
        )

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
            due = self.end.frames_due if self.end is not None else None
            if due is not None:  # results are datagrams: let the last ones land after ``end``
                for _ in range(25):
                    if len({e.frame for e in self.live_errors}) >= due:
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
