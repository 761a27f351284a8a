"""The WebTransport layer end to end: the real aioquic server and client in one process.

Every test runs on loopback against ``serve()`` bound to 127.0.0.1 and ::1 on one UDP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent

from carom_client.webtransport import (
    CertificateMismatch,
    ClientSession,
    SessionClosed,
    WebTransportRefused,
    connect,
)
from carom_router import webtransport
from carom_router.certs import CertBundle, load_certificate, make_certificate
from carom_router.webtransport import (
    MAX_DATAGRAM_PAYLOAD,
    Accept,
    Server,
    SessionHandler,
    WebTransportSession,
    serve,
)
from tests.router.test_certs import make_ca_signed
from tests.services import wait_until_async

HOSTS = ["127.0.0.1", "::1"]
pytestmark = pytest.mark.timeout(30)


class Echo:
    """Echoes stream bytes and datagrams; records what it saw. ``bye`` makes the server close."""

    def __init__(self, session: WebTransportSession) -> None:
        self.session = session
        self.chunks: dict[int, list[bytes]] = defaultdict(list)
        self.datagrams: list[bytes] = []
        self.closed_reasons: list[str] = []
        self.closed_event = asyncio.Event()

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.chunks[stream_id].append(data)
        if data == b"bye":
            self.session.close(9, "server bye")
        elif data == b"raise":
            raise RuntimeError("application bug")
        elif not stream_id & 2:  # bidirectional: reply on it
            self.session.send_stream(stream_id, data, end_stream)

    def datagram(self, data: bytes) -> None:
        self.datagrams.append(data)
        if data == b"oversize":
            assert not self.session.send_datagram(b"x" * (MAX_DATAGRAM_PAYLOAD + 1))
            assert self.session.send_datagram(b"after oversize")
        else:
            self.session.send_datagram(data)

    def closed(self, reason: str) -> None:
        self.closed_reasons.append(reason)
        self.closed_event.set()


class Harness:
    """A server plus the handlers and headers it saw; closes everything at the end."""

    def __init__(self, cert: CertBundle) -> None:
        self.cert = cert
        self.handlers: list[Echo] = []
        self.requests: list[dict[str, str]] = []
        self.server: Server | None = None
        self.clients: list[ClientSession] = []

    def echo(self, session: WebTransportSession, headers: Mapping[str, str]) -> SessionHandler:
        self.requests.append(dict(headers))
        handler = Echo(session)
        self.handlers.append(handler)
        return handler

    async def start(self, accept: Accept | None = None, **options: Any) -> Server:
        self.server = await serve(HOSTS, 0, self.cert, accept or self.echo, **options)
        return self.server

    def url(self, host: str = "127.0.0.1", path: str = "/wt") -> str:
        assert self.server is not None
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.server.port}{path}"

    async def connect(self, host: str = "127.0.0.1", **options: Any) -> ClientSession:
        options.setdefault("cert_sha256", self.cert.sha256)
        session = await connect(self.url(host), **options)
        self.clients.append(session)
        return session

    async def close(self) -> None:
        # Concurrently: each close waits out aioquic's closing period (3 PTO).
        await asyncio.gather(*(client.close() for client in self.clients))
        if self.server is not None:
            self.server.close()


@pytest.fixture(scope="module")
def cert() -> CertBundle:
    return make_certificate()


@pytest_asyncio.fixture
async def wt(cert: CertBundle) -> AsyncIterator[Harness]:
    harness = Harness(cert)
    yield harness
    await harness.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("host", HOSTS)
async def test_stream_echo_in_order_across_packets(wt: Harness, host: str) -> None:
    server = await wt.start()
    client = await wt.connect(host, origin="https://page.example")
    stream = client.open_stream()
    rnd = random.Random(7)
    sent = bytearray()
    while len(sent) < 200_000:
        chunk = rnd.randbytes(rnd.randint(1, 4000))
        stream.write(chunk)
        sent += chunk
    # One length-prefixed message whose header and body go out in separate packets.
    message = rnd.randbytes(3000)
    stream.write(len(message).to_bytes(4, "big"))
    await asyncio.sleep(0.02)
    stream.write(message)
    sent += len(message).to_bytes(4, "big") + message
    stream.write_eof()

    echoed = await asyncio.wait_for(stream.readexactly(len(sent)), 10)
    assert echoed == bytes(sent)
    assert await stream.read() == b""
    assert stream.at_eof()

    (handler,) = wt.handlers
    received = handler.chunks[stream.stream_id]
    assert b"".join(received) == bytes(sent)
    assert len(received) > 50  # really many pieces, not one buffer
    assert handler.session.peer[0] in (host, f"::ffff:{host}")
    assert handler.session.origin == "https://page.example"
    assert wt.requests[0][":protocol"] == "webtransport"
    assert server.counters["sessions_accepted"] == 1


@pytest.mark.asyncio
async def test_datagrams_echo_and_oversize_is_refused_not_queued(wt: Harness) -> None:
    server = await wt.start()
    client = await wt.connect()
    sizes = [1, 100, 500, 1000, MAX_DATAGRAM_PAYLOAD] * 20
    for i, size in enumerate(sizes):
        assert client.send_datagram(i.to_bytes(2, "big") * (size // 2) + b"z" * (size % 2))
        await asyncio.sleep(0)  # loopback: keep within the receive buffers
    got = [await asyncio.wait_for(client.receive_datagram(), 5) for _ in sizes]
    assert sorted(len(d) for d in got) == sorted(sizes)

    assert not client.send_datagram(b"x" * (MAX_DATAGRAM_PAYLOAD + 1))
    assert client.counters["datagrams_oversize"] == 1
    # The server refuses an oversize datagram and what follows still gets out: aioquic would
    # otherwise keep it at the head of its queue and block every later datagram.
    assert client.send_datagram(b"oversize")
    assert await asyncio.wait_for(client.receive_datagram(), 5) == b"after oversize"
    assert server.counters["datagrams_oversize"] == 1
    assert server.counters["datagrams_in"] == len(sizes) + 1
    assert server.counters["datagrams_out"] == len(sizes) + 1


@pytest.mark.asyncio
async def test_client_close_calls_closed_once(wt: Harness) -> None:
    server = await wt.start()
    client = await wt.connect("::1")
    stream = client.open_stream()
    stream.write(b"ping")
    assert await stream.readexactly(4) == b"ping"
    await client.close(5, "done")
    (handler,) = wt.handlers
    await asyncio.wait_for(handler.closed_event.wait(), 3)
    assert handler.closed_reasons == ["closed by client (code 5: done)"]
    assert client.closed.result() == "closed by client (code 5: done)"
    await wait_until_async(  # the connection ends too
        lambda: server.connections_open == 0, "the connection closed", timeout=3, every=0.01
    )
    assert handler.closed_reasons == ["closed by client (code 5: done)"]
    assert handler.session.is_closed
    handler.session.send_stream(stream.stream_id, b"late")  # a no-op, not an error
    assert not handler.session.send_datagram(b"late")
    with pytest.raises(SessionClosed):
        client.open_stream()


@pytest.mark.asyncio
async def test_server_close_reaches_client_and_calls_closed_once(wt: Harness) -> None:
    server = await wt.start()
    client = await wt.connect()
    stream = client.open_stream()
    stream.write(b"bye")
    reason = await asyncio.wait_for(client.wait_closed(), 3)
    assert reason == "closed by server (code 9: server bye)"
    (handler,) = wt.handlers
    assert handler.closed_reasons == ["closed by server (code 9: server bye)"]
    with pytest.raises(SessionClosed):
        await client.receive_datagram()
    await wait_until_async(  # lingers, then closes
        lambda: server.connections_open == 0, "the connection closed", timeout=3, every=0.01
    )
    assert handler.closed_reasons == ["closed by server (code 9: server bye)"]
    assert server.counters["sessions_closed"] == 1


@pytest.mark.asyncio
async def test_session_ended_by_server_right_after_accept(wt: Harness) -> None:
    def accept(session: WebTransportSession, headers: Mapping[str, str]) -> SessionHandler:
        def burst() -> None:
            session.send_datagram(b"hi")
            session.close(3, "at once")

        asyncio.get_running_loop().call_soon(burst)
        return wt.echo(session, headers)

    await wt.start(accept)
    client = await wt.connect()
    assert await asyncio.wait_for(client.wait_closed(), 3) == "closed by server (code 3: at once)"
    assert await client.receive_datagram() == b"hi"  # kept although the session closed
    with pytest.raises(SessionClosed):
        await client.receive_datagram()


@pytest.mark.asyncio
async def test_server_shutdown_ends_every_session(wt: Harness) -> None:
    server = await wt.start()
    clients = [await wt.connect(host) for host in HOSTS]
    server.close()
    for client in clients:
        reason = await asyncio.wait_for(client.wait_closed(), 3)
        assert reason.startswith("connection closed")
    assert [h.closed_reasons for h in wt.handlers] == [["server closing"]] * 2


@pytest.mark.asyncio
async def test_handler_exception_ends_only_its_session(wt: Harness) -> None:
    server = await wt.start()
    bad, good = await wt.connect(), await wt.connect()
    bad.open_stream().write(b"raise")
    assert (
        await asyncio.wait_for(bad.wait_closed(), 3) == "closed by server (code 1: internal error)"
    )
    stream = good.open_stream()
    stream.write(b"still here")
    assert await asyncio.wait_for(stream.readexactly(10), 3) == b"still here"
    assert server.counters["handler_errors"] == 1
    assert server.counters["internal_errors"] == 0


@pytest.mark.asyncio
async def test_unidirectional_streams_are_delivered(wt: Harness) -> None:
    await wt.start()
    client = await wt.connect()
    stream = client.open_stream(unidirectional=True)
    stream.write(b"one way")
    stream.write_eof()
    await wait_until_async(
        lambda: wt.handlers and wt.handlers[0].chunks, "a stream at the server", 3, every=0.01
    )
    (handler,) = wt.handlers
    (stream_id,) = handler.chunks
    assert stream_id == stream.stream_id and stream_id & 2
    await wait_until_async(
        lambda: b"".join(handler.chunks[stream_id]) == b"one way",
        lambda: f"the whole stream at the server (got {b''.join(handler.chunks[stream_id])!r})",
        timeout=3,
        every=0.01,
    )


@pytest.mark.asyncio
async def test_many_streams_on_one_session(wt: Harness) -> None:
    await wt.start()
    client = await wt.connect()
    streams = [client.open_stream() for _ in range(100)]
    for i, stream in enumerate(streams):
        stream.write(f"stream {i:03d}".encode())
        stream.write_eof()
    for i, stream in enumerate(streams):
        assert await asyncio.wait_for(stream.read(), 3) == f"stream {i:03d}".encode()
    assert client._streams == {}  # finished streams are no longer routed


@pytest.mark.asyncio
async def test_wrong_path_is_404(wt: Harness) -> None:
    server = await wt.start()
    with pytest.raises(WebTransportRefused) as refused:
        await connect(wt.url(path="/other"), cert_sha256=wt.cert.sha256)
    assert refused.value.status == 404
    assert server.counters["sessions_refused"] == 1
    assert wt.requests == []  # accept() never asked


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "reason"), [(403, "origin"), (503, "session limit")])
async def test_accept_refusal_reaches_client_as_status(
    wt: Harness, status: int, reason: str
) -> None:
    seen: list[str | None] = []

    def refuse(session: WebTransportSession, headers: Mapping[str, str]) -> tuple[int, str]:
        seen.append(headers.get("origin"))
        return status, reason

    server = await wt.start(refuse)
    with pytest.raises(WebTransportRefused) as refused:
        await connect(wt.url("::1"), cert_sha256=wt.cert.sha256, origin="https://evil.example")
    assert (refused.value.status, refused.value.reason) == (status, reason)
    assert seen == ["https://evil.example"]
    assert server.counters["sessions_refused"] == 1
    assert server.counters["sessions_accepted"] == 0


@pytest.mark.asyncio
async def test_hash_mismatch_fails_the_connect(wt: Harness) -> None:
    server = await wt.start()
    with pytest.raises(CertificateMismatch, match="not the pinned"):
        await connect(wt.url(), cert_sha256=make_certificate().sha256)
    assert server.counters["sessions_accepted"] == 0
    assert wt.requests == []


@pytest.mark.asyncio
async def test_ca_verified_user_certificate(tmp_path: Path) -> None:
    cert_path, key_path, _ = make_ca_signed(tmp_path)
    harness = Harness(load_certificate(cert_path, key_path))
    try:
        await harness.start()
        for host in ("localhost", "127.0.0.1", "::1"):
            client = await connect(harness.url(host), ca_file=str(tmp_path / "ca.pem"))
            await client.close()
        # The same RSA certificate pinned by hash is refused, as Chromium would.
        with pytest.raises(CertificateMismatch, match="ECDSA"):
            await connect(harness.url(), cert_sha256=harness.cert.sha256)
    finally:
        await harness.close()


@pytest.mark.asyncio
async def test_certificate_swap_serves_new_clients(wt: Harness) -> None:
    server = await wt.start()
    old = wt.cert
    before = await wt.connect()
    new = make_certificate(days=1)
    server.set_certificate(new)
    assert server.certificate is new
    after = await wt.connect(cert_sha256=new.sha256)
    with pytest.raises(CertificateMismatch):
        await connect(wt.url(), cert_sha256=old.sha256)
    for client in (before, after):  # the open session keeps working across the swap
        stream = client.open_stream()
        stream.write(b"ok")
        assert await asyncio.wait_for(stream.readexactly(2), 3) == b"ok"


@pytest.mark.asyncio
async def test_garbage_and_stalled_handshakes_do_not_hurt(wt: Harness) -> None:
    server = await wt.start(idle_timeout=1.0)
    rnd = random.Random(3)
    senders = {4: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)}
    senders[6] = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        for family, host in ((4, "127.0.0.1"), (6, "::1")):
            for i in range(200):
                garbage = rnd.randbytes(rnd.randint(1, 1500))
                senders[family].sendto(garbage, (host, server.port))
                if i % 20 == 0:
                    await asyncio.sleep(0.001)  # let the server drain its socket buffer
            for _ in range(10):  # look like QUIC v1 Initials, undecryptable
                initial = b"\xc3\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x08" + os.urandom(8)
                senders[family].sendto(initial + os.urandom(1200), (host, server.port))
        # A real client Initial that is never followed up.
        stalled = QuicConnection(configuration=QuicConfiguration(alpn_protocols=H3_ALPN))
        stalled.connect(("127.0.0.1", server.port), now=time.monotonic())
        for data, _ in stalled.datagrams_to_send(now=time.monotonic()):
            senders[4].sendto(data, ("127.0.0.1", server.port))
        await wait_until_async(
            lambda: server.connections_open >= 1, "the stalled handshake's connection", 3, 0.01
        )

        client = await wt.connect()
        stream = client.open_stream()
        stream.write(b"fine")
        assert await asyncio.wait_for(stream.readexactly(4), 3) == b"fine"
        await client.close()
        await wait_until_async(  # idle timeout
            lambda: server.connections_open == 0, "every connection closed", timeout=5, every=0.01
        )
        assert server.counters["internal_errors"] == 0
    finally:
        for sock in senders.values():
            sock.close()


class _RawH3(QuicConnectionProtocol):
    """A bare HTTP/3 client, to send requests that the WebTransport client never would."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic, stream_handler)
        self.h3 = H3Connection(quic, enable_webtransport=True)
        self.statuses: dict[int, asyncio.Future[int]] = {}
        self.terminated = asyncio.Event()

    def request(self, headers: list[tuple[bytes, bytes]], trailers: bool = False) -> int:
        stream_id = self._quic.get_next_available_stream_id()
        self.statuses[stream_id] = asyncio.get_running_loop().create_future()
        self.h3.send_headers(stream_id, headers)
        if trailers:
            self.h3.send_headers(stream_id, [(b"x-trailer", b"1")], end_stream=True)
        self.transmit()
        return stream_id

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated.set()
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                status = self.statuses.get(h3_event.stream_id)
                if status is not None and not status.done():
                    status.set_result(int(dict(h3_event.headers)[b":status"]))


@contextlib.asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[_RawH3]:
    configuration = QuicConfiguration(
        alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE, max_datagram_frame_size=65536
    )
    async with quic_connect(
        "127.0.0.1", port, configuration=configuration, create_protocol=_RawH3
    ) as protocol:
        yield cast(_RawH3, protocol)


async def raw_request(port: int, headers: list[tuple[bytes, bytes]]) -> int:
    async with raw_client(port) as client:
        return await asyncio.wait_for(client.statuses[client.request(headers)], 3)


BASE = [(b":scheme", b"https"), (b":authority", b"127.0.0.1"), (b":path", b"/wt")]


@pytest.mark.asyncio
async def test_other_requests_on_the_path_are_refused(wt: Harness) -> None:
    server = await wt.start()
    websocket = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *BASE]
    assert await raw_request(server.port, websocket) == 400
    assert await raw_request(server.port, [(b":method", b"CONNECT"), *BASE]) == 400
    assert await raw_request(server.port, [(b":method", b"GET"), *BASE]) == 405
    assert server.counters["sessions_refused"] == 3
    assert wt.requests == []
    client = await wt.connect()  # the server is unaffected
    assert client.session_id == 0


@pytest.mark.asyncio
async def test_request_abuse_on_one_connection(wt: Harness) -> None:
    server = await wt.start()
    get = [(b":method", b"GET"), *BASE]
    async with raw_client(server.port) as client:
        # Trailers after a refused request are not a second request.
        first = client.request(get, trailers=True)
        assert await asyncio.wait_for(client.statuses[first], 3) == 405
        for _ in range(80):
            client.request(get)
        await asyncio.wait_for(client.terminated.wait(), 3)
    # The server counts the close when its own end of the connection is handled, which since
    # the listener reads in batches and transmits once per batch comes after the client saw the
    # CONNECTION_CLOSE (by the first 10 ms poll, in every run here).
    await wait_until_async(
        lambda: server.counters["h3_errors"] == 1,  # closed with H3_EXCESSIVE_LOAD
        lambda: f"the close counted: {server.counters['h3_errors']}",
        timeout=5,
        every=0.01,
    )
    assert server.counters["sessions_refused"] == 64
    assert server.counters["internal_errors"] == 0


@pytest.mark.asyncio
async def test_many_sessions_in_parallel(wt: Harness) -> None:
    server = await wt.start()

    async def one(i: int) -> bytes:
        client = await wt.connect(HOSTS[i % 2])
        stream = client.open_stream()
        stream.write(f"session {i:03d}".encode())
        echoed = await asyncio.wait_for(stream.readexactly(11), 5)
        client.send_datagram(echoed)
        assert await asyncio.wait_for(client.receive_datagram(), 5) == echoed
        return echoed

    echoed = await asyncio.gather(*(one(i) for i in range(40)))
    assert sorted(echoed) == [f"session {i:03d}".encode() for i in range(40)]
    assert server.sessions_open == 40
    assert server.counters["sessions_accepted"] == 40


@pytest.mark.asyncio
async def test_one_address_holds_a_bounded_number_of_connections(wt: Harness) -> None:
    server = await wt.start(max_connections_per_address=3)
    held = [await wt.connect("127.0.0.1") for _ in range(3)]
    # A fourth handshake from 127.0.0.1 is dropped unanswered: no state is made for it.
    with pytest.raises(TimeoutError):
        await connect(wt.url("127.0.0.1"), cert_sha256=wt.cert.sha256, timeout=1.0)
    assert server.counters["connections_refused"] >= 1 and server.connections_open == 3
    # Another address is not affected.
    other = await wt.connect("::1")
    stream = other.open_stream()
    stream.write(b"other")
    assert await asyncio.wait_for(stream.readexactly(5), 3) == b"other"
    # Once one of its connections has closed, the address may connect again.
    await held[0].close()
    await wait_until_async(
        lambda: server.connections_open == 3, "the closed connection gone", timeout=5, every=0.01
    )
    again = await wt.connect("127.0.0.1")
    assert again.session_id == 0


@pytest.mark.asyncio
async def test_a_connection_that_never_asks_for_a_session_is_closed(
    wt: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webtransport, "REQUEST_TIMEOUT", 0.3)
    server = await wt.start()
    async with raw_client(server.port) as client:  # handshakes, then says nothing
        await asyncio.wait_for(client.terminated.wait(), 3)
    assert server.counters["connections_no_request"] == 1
    await wait_until_async(
        lambda: server.connections_open == 0, "the connection closed", timeout=3, every=0.01
    )


@pytest.mark.asyncio
async def test_wildcards_bind_both_families_and_a_taken_port_fails(wt: Harness) -> None:
    server = await wt.start()
    with pytest.raises(OSError):
        await serve(["127.0.0.1"], server.port, wt.cert, wt.echo)
    # IPv6 sockets are v6-only, so the IPv4 and IPv6 wildcards share one port.
    both = await serve(["0.0.0.0", "::"], 0, wt.cert, wt.echo)
    try:
        assert [len(a) for a in both.addresses] == [2, 4]
        assert both.addresses[0][1] == both.addresses[1][1] == both.port
        for host in HOSTS:
            url = f"https://{'[::1]' if host == '::1' else host}:{both.port}/wt"
            client = await connect(url, cert_sha256=wt.cert.sha256)
            await client.close()
    finally:
        both.close()
