"""WebTransport client on aioquic, for tests, the load generator and the bench.

aioquic has no WebTransport client API, but its HTTP/3 layer speaks the protocol: this module
sends the extended CONNECT, then moves stream bytes and datagrams, behaving as Chromium does
where that matters to a server:

- with ``cert_sha256`` the server is checked like ``serverCertificateHashes``: the SHA-256 of its
  DER certificate must match, the certificate must be ECDSA and valid now for at most 14 days;
  no CA and no host name are involved (the TLS handshake still proves the server holds the key);
- one QUIC connection per session; the session ends with a CLOSE_WEBTRANSPORT_SESSION capsule
  and FIN on the CONNECT stream.

aioquic's ``create_webtransport_stream`` does not register the bidirectional stream it opens, so
HTTP/3 would parse the server's replies as frames and drop them: this module takes the QUIC
events of its own streams before HTTP/3 sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from types import TracebackType

from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.h3.connection import H3_ALPN, H3Connection, Setting
from aioquic.h3.events import (
    DatagramReceived,
    DataReceived,
    H3Event,
    HeadersReceived,
    WebTransportStreamDataReceived,
)
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from carom_runtime import webtransport as wire
from carom_runtime.webtransport import CLOSE_WEBTRANSPORT_SESSION as CLOSE_WEBTRANSPORT_SESSION
from carom_runtime.webtransport import MAX_DATAGRAM_PAYLOAD as MAX_DATAGRAM_PAYLOAD
from carom_runtime.webtransport import MAX_HASH_VALIDITY as MAX_HASH_VALIDITY
from carom_runtime.webtransport import SOCKET_BUFFER as SOCKET_BUFFER

log = logging.getLogger(__name__)

# MAX_DATAGRAM_PAYLOAD, MAX_HASH_VALIDITY, SOCKET_BUFFER and CLOSE_WEBTRANSPORT_SESSION (imported
# above "as" themselves) stay names of this module; they are defined in carom_runtime.webtransport.

_BAD_CERTIFICATE = QuicErrorCode.CRYPTO_ERROR + 42  # TLS alert bad_certificate
_MAX_REFUSAL_BODY = 4096
_MAX_EARLY_DATAGRAMS = 64
#: Seconds close() waits for the server to end its side of the CONNECT stream.
_CLOSE_WAIT = 1.0


class WebTransportError(Exception):
    """The session could not be opened or was lost."""


class WebTransportRefused(WebTransportError):
    """The server answered the CONNECT with a status other than 200."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"WebTransport refused: {status}{' ' + reason if reason else ''}")
        self.status = status
        self.reason = reason


class CertificateMismatch(WebTransportError):
    """The server's certificate is not the pinned one (or Chromium would refuse it by hash)."""


class SessionClosed(WebTransportError):
    """The session is closed; the argument says why."""


class ClientStream:
    """A stream this client opened; the server's bytes are kept until read (bounded)."""

    def __init__(
        self, session: ClientSession, stream_id: int, max_buffer: int, readable: bool
    ) -> None:
        self.stream_id = stream_id
        self._session = session
        self._max_buffer = max_buffer
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = not readable
        self._write_ended = False
        self._error: WebTransportError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # writing

    def write(self, data: bytes) -> None:
        """Queue ``data`` in aioquic and transmit at once."""
        self._session._protocol.write(self.stream_id, data, end_stream=False)

    def write_eof(self) -> None:
        self._session._protocol.write(self.stream_id, b"", end_stream=True)
        self._write_ended = True
        self._release()

    # reading

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes as soon as some are there (``-1``: everything until EOF)."""
        if n < 0:
            while not self._eof:
                await self._wait()
            return self._take(self._size)
        while not self._chunks and not self._eof:
            await self._wait()
        return self._take(min(n, self._size))

    async def readexactly(self, n: int) -> bytes:
        while self._size < n:
            if self._eof:
                if self._error is not None:
                    raise self._error
                raise asyncio.IncompleteReadError(self._take(self._size), n)
            await self._wait()
        return self._take(n)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        """Chunks as they arrive, until EOF."""
        while True:
            while not self._chunks and not self._eof:
                await self._wait()
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return
            chunk = self._chunks.popleft()
            self._size -= len(chunk)
            yield chunk

    def _take(self, n: int) -> bytes:
        if n == 0 and self._error is not None and not self._chunks:
            raise self._error
        parts: list[bytes] = []
        while n > 0 and self._chunks:
            chunk = self._chunks.popleft()
            if len(chunk) > n:
                self._chunks.appendleft(chunk[n:])
                chunk = chunk[:n]
            parts.append(chunk)
            n -= len(chunk)
            self._size -= len(chunk)
        return b"".join(parts)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes, end_stream: bool) -> None:
        if self._eof:
            return
        if data:
            self._chunks.append(data)
            self._size += len(data)
            if self._size > self._max_buffer:
                self._fail(WebTransportError(f"stream {self.stream_id}: reader fell behind"))
                self._session._protocol.stop(self.stream_id)
                return
        if end_stream:
            self._eof = True
            self._release()
        self._wake()

    def _fail(self, error: WebTransportError) -> None:
        """No more bytes: what is buffered can still be read, then ``error`` is raised."""
        if not self._eof:
            self._eof = True
            self._error = error
        self._release()
        self._wake()

    def _release(self) -> None:
        """Both directions done: stop routing events to this stream (its bytes stay readable)."""
        if self._eof and self._write_ended:
            self._session._streams.pop(self.stream_id, None)


class ClientSession:
    """An open WebTransport session; ``closed`` resolves with the reason once it ends."""

    def __init__(
        self,
        protocol: _ClientProtocol,
        exit_stack: contextlib.AsyncExitStack,
        session_id: int,
        response_headers: dict[str, str],
        *,
        max_datagrams: int,
        max_pending_datagrams: int,
        max_stream_buffer: int,
    ) -> None:
        self.session_id = session_id
        self.response_headers = response_headers
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "datagrams_in",
                "datagrams_out",
                "datagrams_dropped",  # received while max_datagrams were unread
                "datagrams_refused",  # send_datagram: congested (see connect) or closed
                "datagrams_oversize",  # send_datagram: over MAX_DATAGRAM_PAYLOAD
                "streams_ignored",
            ),
            0,
        )
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._protocol = protocol
        self._exit_stack = exit_stack
        self._streams: dict[int, ClientStream] = {}
        self._datagrams: deque[bytes] = deque()
        self._max_datagrams = max_datagrams
        self._max_pending_datagrams = max_pending_datagrams
        self._max_stream_buffer = max_stream_buffer
        self._datagram_waiter: asyncio.Future[None] | None = None
        self._teardown: asyncio.Task[None] | None = None
        protocol.session = self
        for data in protocol.early_datagrams:
            self._datagram(data)
        protocol.early_datagrams.clear()
        if protocol.ended is not None:  # ended in the same packet as the 200
            self._ended_by_server(protocol.ended)

    @property
    def max_datagram_size(self) -> int:
        return MAX_DATAGRAM_PAYLOAD

    def open_stream(self, unidirectional: bool = False) -> ClientStream:
        """Open a stream on the session (its header goes out at once)."""
        self._check_open()
        stream_id = self._protocol.h3.create_webtransport_stream(self.session_id, unidirectional)
        stream = ClientStream(self, stream_id, self._max_stream_buffer, not unidirectional)
        self._streams[stream_id] = stream
        self._protocol.transmit()
        return stream

    def datagrams_queued(self) -> int:
        """Datagrams handed to QUIC and not on the wire yet (they leave as the congestion window
        opens; closing the session drops them)."""
        return wire.datagrams_queued(self._protocol._quic)

    def send_datagram(self, data: bytes) -> bool:
        """Send one datagram and transmit; False (and counted) if too large, congested or closed."""
        if len(data) > MAX_DATAGRAM_PAYLOAD:
            self.counters["datagrams_oversize"] += 1
            return False
        # aioquic queues datagrams without limit while its congestion window is full.
        if self.closed.done() or self.datagrams_queued() >= self._max_pending_datagrams:
            self.counters["datagrams_refused"] += 1
            return False
        self._protocol.h3.send_datagram(self.session_id, data)
        self._protocol.transmit()
        self.counters["datagrams_out"] += 1
        return True

    async def receive_datagram(self) -> bytes:
        """The next datagram; raises :class:`SessionClosed` once closed and none is left."""
        while not self._datagrams:
            if self.closed.done():
                raise SessionClosed(self.closed.result())
            self._datagram_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._datagram_waiter
            finally:
                self._datagram_waiter = None
        return self._datagrams.popleft()

    async def close(self, code: int = 0, reason: str = "") -> None:
        """Close the session (capsule + FIN), then its QUIC connection.

        Returns once aioquic's closing period (3 PTO) is over: about 0.1 s on an idle loopback,
        around 1 s after a burst of handshakes. Close many sessions concurrently.
        """
        wire.check_close_code(code)
        if not self.closed.done():
            self._protocol.end_connect_stream(wire.encode_close(code, reason))
            self._set_closed(wire.close_reason("client", wire.SessionClose(code, reason)))
            # Give the server's FIN a moment, so it sees a clean close rather than a lost link.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._protocol.connect_fin), _CLOSE_WAIT)
        await asyncio.shield(self._start_teardown())

    async def wait_closed(self) -> str:
        return await asyncio.shield(self.closed)

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # called by the protocol

    def _check_open(self) -> None:
        if self.closed.done():
            raise SessionClosed(self.closed.result())

    def _datagram(self, data: bytes) -> None:
        if len(self._datagrams) >= self._max_datagrams:
            self.counters["datagrams_dropped"] += 1
            return
        self.counters["datagrams_in"] += 1
        self._datagrams.append(data)
        if self._datagram_waiter is not None and not self._datagram_waiter.done():
            self._datagram_waiter.set_result(None)

    def _set_closed(self, reason: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        for stream in list(self._streams.values()):
            stream._fail(SessionClosed(reason))
        if self._datagram_waiter is not None and not self._datagram_waiter.done():
            self._datagram_waiter.set_result(None)

    def _ended_by_server(self, reason: str) -> None:
        """The server ended the session or connection: release the connection in the background."""
        self._set_closed(reason)
        self._start_teardown()

    def _start_teardown(self) -> asyncio.Task[None]:
        """Close the QUIC connection and its socket, once, whoever asks first."""
        if self._teardown is None:
            self._teardown = asyncio.get_running_loop().create_task(self._exit_stack.aclose())
            self._teardown.add_done_callback(_log_failure)
        return self._teardown


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        cert_sha256: bytes | None,
    ) -> None:
        super().__init__(quic, stream_handler)
        self.h3 = H3Connection(quic, enable_webtransport=True)
        self.session: ClientSession | None = None
        self.certificate_error: CertificateMismatch | None = None
        self.terminated: str | None = None
        self.ended: str | None = None
        loop = asyncio.get_running_loop()
        self.settings: asyncio.Future[dict[int, int]] = loop.create_future()
        self.response: asyncio.Future[tuple[int, dict[str, str]]] = loop.create_future()
        self.refusal: asyncio.Future[str] = loop.create_future()
        self.connect_fin: asyncio.Future[None] = loop.create_future()
        self.connect_stream_id: int | None = None
        self.early_datagrams: list[bytes] = []
        self._cert_sha256 = cert_sha256
        self._status = 0
        self._body = b""
        self._capsules = wire.CapsuleReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)

    # requests from the session

    def send_connect(self, headers: list[tuple[bytes, bytes]]) -> int:
        stream_id = self._quic.get_next_available_stream_id()
        self.connect_stream_id = stream_id
        self.h3.send_headers(stream_id, headers)
        self.transmit()
        return stream_id

    def write(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self.session is not None:
            self.session._check_open()
        self._quic.send_stream_data(stream_id, data, end_stream)
        self.transmit()

    def stop(self, stream_id: int) -> None:
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, 0)
            self.transmit()

    def end_connect_stream(self, capsule: bytes) -> None:
        assert self.connect_stream_id is not None
        with contextlib.suppress(Exception):  # the stream or connection may be gone already
            self.h3.send_data(self.connect_stream_id, capsule, end_stream=True)
            self.transmit()

    # events

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self._terminated(event)
            return
        if self.certificate_error is not None:
            return
        if isinstance(event, HandshakeCompleted):
            self._check_certificate()
            return
        session = self.session
        stream = None if session is None else session._streams.get(getattr(event, "stream_id", -1))
        if stream is not None:
            # Our own streams: HTTP/3 does not know them (see the module docstring).
            if isinstance(event, StreamDataReceived):
                stream._feed(event.data, event.end_stream)
            elif isinstance(event, StreamReset):
                stream._fail(WebTransportError(f"stream reset by server ({event.error_code})"))
            return
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)
        if not self.settings.done() and self.h3.received_settings is not None:
            self.settings.set_result(self.h3.received_settings)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, DatagramReceived):
            if event.stream_id != self.connect_stream_id:
                pass
            elif self.session is not None:
                self.session._datagram(event.data)
            elif len(self.early_datagrams) < _MAX_EARLY_DATAGRAMS:
                self.early_datagrams.append(event.data)  # before connect() returned
        elif isinstance(event, HeadersReceived) and event.stream_id == self.connect_stream_id:
            if self.response.done():
                return  # trailers
            headers = wire.header_map(event.headers)
            self._status = int(headers.get(":status", "0"))
            self.response.set_result((self._status, headers))
            if event.stream_ended:
                self._connect_ended()
        elif isinstance(event, DataReceived) and event.stream_id == self.connect_stream_id:
            if self._status != 200:
                self._body = (self._body + event.data)[:_MAX_REFUSAL_BODY]
            else:
                self._capsules.feed(event.data)  # the reader keeps the close, if one comes
            if event.stream_ended:
                self._connect_ended()
        elif isinstance(event, WebTransportStreamDataReceived) and self.session is not None:
            self.session.counters["streams_ignored"] += 1  # server-opened: not supported

    def _connect_ended(self) -> None:
        if not self.connect_fin.done():
            self.connect_fin.set_result(None)
        if self._status != 200:
            if not self.refusal.done():
                self.refusal.set_result(self._body.decode("utf-8", "replace"))
        else:
            self.ended = wire.close_reason("server", self._capsules.close)
            if self.session is not None:
                self.session._ended_by_server(self.ended)

    def _check_certificate(self) -> None:
        if self._cert_sha256 is None:
            return
        # aioquic keeps the peer certificate only on its TLS context (private attribute).
        cert = getattr(self._quic.tls, "_peer_certificate", None)
        problem = "no certificate" if cert is None else None
        if cert is not None:
            der = cert.public_bytes(serialization.Encoding.DER)
            validity = cert.not_valid_after_utc - cert.not_valid_before_utc
            now = datetime.now(UTC)
            if hashlib.sha256(der).digest() != self._cert_sha256:
                got = hashlib.sha256(der).hexdigest()
                problem = f"SHA-256 {got} is not the pinned {self._cert_sha256.hex()}"
            elif not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
                problem = "pinned certificate is not ECDSA (Chromium refuses it)"
            elif validity > MAX_HASH_VALIDITY:
                problem = f"pinned certificate is valid {validity} > 14 days (Chromium refuses it)"
            elif not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                problem = "pinned certificate is not valid now"
        if problem is not None:
            self.certificate_error = CertificateMismatch(f"server certificate: {problem}")
            self._quic.close(error_code=_BAD_CERTIFICATE, reason_phrase="certificate mismatch")
            self.transmit()

    def _terminated(self, event: ConnectionTerminated) -> None:
        phrase = f": {event.reason_phrase}" if event.reason_phrase else ""
        reason = f"connection closed (error {event.error_code:#x}{phrase})"
        self.terminated = reason
        for future in (self.settings, self.response, self.refusal):
            if not future.done():
                future.set_exception(WebTransportError(reason))
                future.exception()  # retrieved: connect() may no longer be waiting
        if not self.connect_fin.done():
            self.connect_fin.set_result(None)
        self.ended = self.ended or reason
        if self.session is not None:
            self.session._ended_by_server(reason)


async def connect(
    url: str,
    *,
    cert_sha256: bytes | None = None,
    ca_file: str | None = None,
    origin: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    timeout: float = 10.0,
    max_datagrams: int = 1024,
    max_pending_datagrams: int = 1024,
    max_stream_buffer: int = 16 * 1024 * 1024,
) -> ClientSession:
    """Open a WebTransport session at ``https://host:port/path``.

    ``cert_sha256`` pins the server certificate by hash (as Chromium's serverCertificateHashes);
    otherwise it is verified against ``ca_file`` (or the system's CAs) and the host name.
    Received datagrams beyond ``max_datagrams`` unread ones are dropped and counted; so are sent
    ones while ``max_pending_datagrams`` wait in aioquic for congestion-window room.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"not an https:// URL: {url!r}")
    if cert_sha256 is not None and len(cert_sha256) != 32:
        raise ValueError("cert_sha256 must be the 32-byte SHA-256 of the DER certificate")
    host, port = parts.hostname, parts.port or 443
    authority = parts.netloc.rpartition("@")[2]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        max_datagram_frame_size=65536,
        server_name=host,
    )
    if cert_sha256 is not None:
        configuration.verify_mode = ssl.CERT_NONE  # checked against the hash after the handshake
    elif ca_file is not None:
        configuration.load_verify_locations(cafile=ca_file)

    request = [
        (b":method", b"CONNECT"),
        (b":protocol", b"webtransport"),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        wire.DRAFT02_REQUEST_HEADER,
    ]
    if origin is not None:
        request.append((b"origin", origin.encode()))
    request += [(k.lower().encode(), v.encode()) for k, v in headers]

    made: list[_ClientProtocol] = []

    def create_protocol(
        quic: QuicConnection, stream_handler: QuicStreamHandler | None = None
    ) -> _ClientProtocol:
        made.append(_ClientProtocol(quic, stream_handler, cert_sha256=cert_sha256))
        return made[-1]

    stack = contextlib.AsyncExitStack()
    try:
        async with asyncio.timeout(timeout):
            await stack.enter_async_context(
                quic_connect(
                    host, port, configuration=configuration, create_protocol=create_protocol
                )
            )
            protocol = made[0]
            if protocol.certificate_error is not None:
                raise protocol.certificate_error
            settings = await protocol.settings
            if settings.get(Setting.ENABLE_WEBTRANSPORT) != 1:
                raise WebTransportError(f"{authority} does not offer WebTransport over HTTP/3")
            session_id = protocol.send_connect(request)
            status, response_headers = await protocol.response
            if status != 200:
                raise WebTransportRefused(status, await protocol.refusal)
            return ClientSession(
                protocol,
                stack,
                session_id,
                response_headers,
                max_datagrams=max_datagrams,
                max_pending_datagrams=max_pending_datagrams,
                max_stream_buffer=max_stream_buffer,
            )
    except ConnectionError:
        await _abandon(stack)
        why = (made[0].terminated if made else None) or "handshake failed"
        raise WebTransportError(f"cannot connect to {authority}: {why}") from None
    except BaseException:
        await _abandon(stack)
        raise


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("WebTransport teardown failed", exc_info=task.exception())


async def _abandon(stack: contextlib.AsyncExitStack) -> None:
    # The QUIC close must not hang a failing connect for long.
    with contextlib.suppress(Exception, TimeoutError):
        await asyncio.wait_for(stack.aclose(), 2.0)
