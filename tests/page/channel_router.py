"""A stand-in for the router's side of a page's channel streams, for tests of the page alone.

The real WebTransport server (``carom_router.webtransport.serve``) in a thread of its own, with a
handler that does the least a router does for a page: answers its hello with a welcome, reads
each client-opened unidirectional stream with ``carom.channels.ChannelReader`` and notes every
frame, every stream's end and the bye, in the order they arrived; it never answers the offer
(no simulator). So a test sees the page's channel streams on the wire, and that they all end
before its bye, without the router's channel code (tests/router tests that).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from carom import channels as ch
from carom import protocol as p
from carom_router.certs import CertBundle, make_certificate
from carom_router.webtransport import Server, SessionHandler, WebTransportSession, serve


@dataclass
class Event:
    """What the stand-in saw, in order: ``frame`` (with it), ``fin`` of a stream, ``bye``."""

    what: str
    stream_id: int | None = None
    frame: ch.Frame | None = None


@dataclass
class PageSession:
    session: WebTransportSession
    events: list[Event] = field(default_factory=list)
    control_id: int | None = None
    hello: p.Hello | None = None
    readers: dict[int, ch.ChannelReader] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class _Handler:
    def __init__(self, owner: PageSession) -> None:
        self.s = owner
        self.control = p.FrameReader()

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        s = self.s
        try:
            if stream_id & 2:  # a channel stream
                reader = s.readers.setdefault(stream_id, ch.ChannelReader())
                reader.push(data)
                while (got := reader.next(lambda _t: ch.MAX_MESSAGE_BYTES)) is not None:
                    assert isinstance(got, ch.Frame), got
                    s.events.append(Event("frame", stream_id, got))
                if end_stream:
                    if reader.pending:
                        s.errors.append(f"stream {stream_id} ended inside a frame")
                    s.events.append(Event("fin", stream_id))
                return
            s.control_id = stream_id
            for body in self.control.feed(data):
                msg = p.parse_client(body)
                if isinstance(msg, p.Hello):
                    s.hello = msg
                    welcome = p.Welcome(session_id=msg.session_id, max_report_rate=1000.0)
                    s.session.send_stream(stream_id, p.frame(welcome))
                elif isinstance(msg, p.Bye):
                    s.events.append(Event("bye"))
                    s.session.close(0, "bye")
        except Exception as exc:  # the test reads it: any failure here is one
            s.errors.append(f"{type(exc).__name__}: {exc}")

    def datagram(self, data: bytes) -> None:
        pass

    def closed(self, reason: str) -> None:
        pass


class ChannelRouter:
    """``serve`` on 127.0.0.1 in a thread; ``sessions`` in the order they came."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cert: CertBundle) -> None:
        self.loop = loop
        self.cert = cert
        self.port = 0
        self.sessions: list[PageSession] = []

    def accept(self, session: WebTransportSession, headers: Mapping[str, str]) -> SessionHandler:
        owner = PageSession(session)
        self.sessions.append(owner)
        return _Handler(owner)

    @property
    def config(self) -> dict[str, Any]:
        """What the page's ``/config`` gives it."""
        return {
            "webtransport_url": f"https://127.0.0.1:{self.port}/wt",
            "cert_sha256_hex": self.cert.sha256_hex,
        }

    def send_control(self, s: PageSession, msg: p.RouterMessage) -> None:
        """A control message to the page, from the test's thread."""
        assert s.control_id is not None
        stream_id = s.control_id
        self.loop.call_soon_threadsafe(s.session.send_stream, stream_id, p.frame(msg))


@contextmanager
def channel_router() -> Iterator[ChannelRouter]:
    loop = asyncio.new_event_loop()
    router = ChannelRouter(loop, make_certificate())

    async def start() -> Server:
        return await serve(["127.0.0.1"], 0, router.cert, router.accept, idle_timeout=60.0)

    thread = threading.Thread(target=loop.run_forever, name="channel-router", daemon=True)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        router.port = server.port
        try:
            yield router
        finally:
            loop.call_soon_threadsafe(server.close)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
