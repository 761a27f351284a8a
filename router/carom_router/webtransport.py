"""WebTransport server: aioquic's HTTP/3 state machine, thin asyncio glue, bytes in and out.

This layer knows nothing of Carom's messages. It accepts extended CONNECT ``:protocol
webtransport`` (draft-02, as Chromium speaks it) on one path, asks the application whether to
accept each session (``accept``), then moves stream bytes and datagrams between the QUIC
connection and the application's :class:`SessionHandler`.

What Chromium does and this module relies on (see docs measured with Chromium 156):

- every WebTransport session is its own QUIC connection, so connections are independent and one
  failing never touches another;
- Chromium sends capsules (a GREASE one, then CLOSE_WEBTRANSPORT_SESSION) on the CONNECT stream;
  they are not application data. The session ends on that stream's FIN, its reset, or the end of
  the QUIC connection: ``closed`` is then called exactly once;
- a DATAGRAM frame must fit one QUIC packet: aioquic never splits it, and one that does not fit
  stays at the head of its queue and blocks every datagram after it. ``send_datagram`` refuses
  anything over :data:`MAX_DATAGRAM_PAYLOAD`;
- aioquic only sends when told to: every write here is followed by ``transmit()``.

What one client address can hold is bounded here, before any application code runs: at most
``max_connections_per_address`` QUIC connections at once (a further handshake from it is
dropped before aioquic allocates anything for it), and a connection that has not asked for a
session within :data:`REQUEST_TIMEOUT` is closed. Measured before: 300 CONNECTs at once from one
script made 300 connections, and the round added 27 MB to the router (87 -> 114 MB).

Streams the client opens (bidirectional or unidirectional) reach ``stream_data``; the server
replies on a client-opened bidirectional stream with ``send_stream``. The server does not open
streams of its own: aioquic's ``create_webtransport_stream`` does not register a bidirectional
stream it creates, so the peer's reply would be misparsed as HTTP/3 frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameUnexpected, H3Connection
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
    ProtocolNegotiated,
    QuicEvent,
    StreamReset,
)
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from carom.impairment import Counts, Link, Path
from carom_router.certs import CertBundle, load_into
from carom_runtime import webtransport as wire
from carom_runtime.impair import DelayLine
from carom_runtime.webtransport import CLOSE_WEBTRANSPORT_SESSION as CLOSE_WEBTRANSPORT_SESSION
from carom_runtime.webtransport import MAX_DATAGRAM_PAYLOAD as MAX_DATAGRAM_PAYLOAD
from carom_runtime.webtransport import SOCKET_BUFFER as SOCKET_BUFFER

log = logging.getLogger(__name__)

# MAX_DATAGRAM_PAYLOAD, SOCKET_BUFFER and CLOSE_WEBTRANSPORT_SESSION (imported above "as"
# themselves) stay names of this module; they are defined in carom_runtime.webtransport.

#: Datagrams waiting in aioquic for congestion-window room, beyond which new ones are dropped.
MAX_PENDING_DATAGRAMS = 256
#: Requests (CONNECTs or others) answered on one QUIC connection before it is closed.
MAX_REQUESTS = 64
#: Seconds a QUIC connection is kept once its last session ended, then closed.
LINGER = 1.0
#: Seconds a new QUIC connection has to ask for a session (handshake + CONNECT), then closed.
#: Both take a few milliseconds on a working link; a connection that only handshakes would
#: otherwise hold its state until the idle timeout (30 s).
REQUEST_TIMEOUT = 5.0
#: Bytes of a refusal's text body sent, as many as a close message holds.
_MAX_REFUSAL_BODY = wire.MAX_CLOSE_MESSAGE
#: Datagrams read from a socket per wake-up of the event loop (asyncio reads one). With the
#: transmit once per batch: 5,800-6,500 -> 9,000-10,700 reports/s per router core, one report per
#: QUIC packet from 4 busy sessions (bench/results/router-ab.md).
READ_BATCH = 64
#: Largest UDP datagram read.
_RECV_SIZE = 65536
#: Seconds a connection waits before acknowledging what it received: the max_ack_delay aioquic
#: advertises (25 ms) less a margin, instead of the 1 ms it uses. Reports are datagrams, never
#: retransmitted, so a later ACK delays nothing the session waits for, and the peer's loss timers
#: already allow max_ack_delay; stream bytes (control, typed channels) are acknowledged later too,
#: so a client's congestion window frees later. Measured with 64 sessions at 60 reports/s:
#: 4,700-4,800 -> 5,000-5,100 reports/s per router core (bench/results/router-ab.md).
ACK_DELAY = 0.020


class SessionHandler(Protocol):
    """What the application gives for each accepted session. Calls never overlap."""

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Bytes of a client-opened stream, in order.

        ``stream_id & 2`` marks a unidirectional stream. A stream the client resets ends with
        ``end_stream`` too (and ``data`` empty): no more bytes will come on it either way.
        """

    def datagram(self, data: bytes) -> None:
        """One datagram of the session."""

    def closed(self, reason: str) -> None:
        """The session ended (either side, or its connection): called once, and nothing after."""


_COUNTERS = (
    "connections",  # QUIC connections created (including ones that never finish the handshake)
    "connections_refused",  # handshakes dropped: their address had max_connections_per_address
    "connections_no_request",  # closed after REQUEST_TIMEOUT without asking for a session
    "sessions_accepted",
    "sessions_refused",  # any non-200 answer to a request, whoever decided it
    "sessions_closed",
    "datagrams_in",
    "datagrams_out",
    "datagrams_oversize",  # refused by send_datagram: over MAX_DATAGRAM_PAYLOAD
    "datagrams_dropped",  # refused by send_datagram: aioquic's queue full, or session closed
    "datagrams_unrouted",  # received for no open session
    "h3_errors",  # connections closed with an HTTP/3 or QPACK error code (malformed HTTP/3)
    "handler_errors",  # exceptions raised by the application's accept or handler
    "internal_errors",  # exceptions in this module; the connection is closed, the server lives
)


class WebTransportSession:
    """One accepted (or being decided) WebTransport session, as the application sees it."""

    def __init__(
        self,
        connection: _WebTransportProtocol,
        session_id: int,
        *,
        path: str,
        query: dict[str, str],
        origin: str | None,
        authority: str,
        peer: tuple[Any, ...],
    ) -> None:
        self.session_id = session_id
        "Stream ID of the CONNECT request; quarter of it tags the session's datagrams."
        self.path = path
        self.query = query
        self.origin = origin
        self.authority = authority
        self.peer = peer
        "The client's UDP address when the session opened."
        self._connection = connection
        self._handler: SessionHandler | None = None
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def max_datagram_size(self) -> int:
        return MAX_DATAGRAM_PAYLOAD

    def send_stream(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Write on a stream of this session and transmit; a no-op once the session closed.

        Bytes are buffered by aioquic without limit; a caller that may outpace the client
        should bound what it writes.
        """
        if self._closed:
            return
        self._connection.send_stream(stream_id, data, end_stream)

    def send_datagram(self, data: bytes) -> bool:
        """Send one datagram and transmit. False (and counted) if it cannot be sent."""
        return self._connection.send_datagram(self, data)

    def datagram_room(self) -> int:
        """How many datagrams ``send_datagram`` takes right now (0 once closed).

        aioquic holds datagrams while the congestion window is full; past
        ``MAX_PENDING_DATAGRAMS`` of them new ones are refused. A caller with more to send keeps
        them and asks again later instead of having them dropped.
        """
        return 0 if self._closed else self._connection.datagram_room()

    def impair(self, reports: Path, results: Path, seed: int | None = None) -> None:
        """Emulate a network on this session's connection (``carom.impairment``).

        ``reports`` acts on every UDP datagram the client sends, ``results`` on every one this
        side sends: QUIC's own packets (acks, handshake, streams) take the same path as the
        session's datagrams, as on a real network, so QUIC's loss recovery and congestion
        control react to it. A connection carries one session (the page's). A later call (a live
        change, or a second session's profile) takes over from then on: packets already on the
        emulated wire arrive as the old paths said.
        """
        self._connection.impair(reports, results, seed)

    def impairment_counts(self) -> tuple[Counts, Counts] | None:
        """What the emulation did so far (reports, results), or None without one."""
        return self._connection.impairment_counts()

    def close(self, code: int = 0, reason: str = "") -> None:
        """End the session with CLOSE_WEBTRANSPORT_SESSION and FIN; calls ``closed`` now."""
        wire.check_close_code(code)
        if self._closed:
            return
        self._connection.close_session(self, code, reason)

    def __repr__(self) -> str:
        return f"<WebTransportSession {self.session_id} {self.path} from {self.peer}>"


Refusal = tuple[int, str]
#: Decides on each CONNECT, given its headers (pseudo-headers included, names lower-case): a
#: handler accepts the session, ``(status, reason)`` refuses it with that HTTP status.
Accept = Callable[[WebTransportSession, Mapping[str, str]], SessionHandler | Refusal]


class Server:
    """The UDP endpoints and every QUIC connection on them; returned by :func:`serve`."""

    def __init__(
        self,
        configuration: QuicConfiguration,
        certificate: CertBundle,
        accept: Accept,
        path: str,
        max_connections_per_address: int | None = None,
    ) -> None:
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.path = path
        self.addresses: list[tuple[Any, ...]] = []
        self.max_connections_per_address = max_connections_per_address
        self._accept = accept
        self._configuration = configuration
        self._certificate = certificate
        self._connections: set[_WebTransportProtocol] = set()
        #: Open connections per client host; a host leaves with its last connection.
        self._per_host: dict[str, int] = {}
        self._transports: list[asyncio.DatagramTransport] = []
        self._closed = False

    @property
    def port(self) -> int:
        return int(self.addresses[0][1])

    @property
    def certificate(self) -> CertBundle:
        return self._certificate

    @property
    def sessions_open(self) -> int:
        return sum(len(c.sessions) for c in self._connections)

    @property
    def connections_open(self) -> int:
        return len(self._connections)

    def set_certificate(self, bundle: CertBundle) -> None:
        """Use ``bundle`` for new connections; open ones keep theirs (a renewal drops no one)."""
        # Every connection reads the certificate from this shared configuration when it starts.
        load_into(self._configuration, bundle)
        self._certificate = bundle

    def close(self) -> None:
        """End every session (``closed`` is called), close every connection, stop listening."""
        if self._closed:
            return
        self._closed = True
        for connection in list(self._connections):
            connection.shutdown("server closing")
        self._connections.clear()
        for transport in self._transports:
            transport.close()

    def _create_protocol(
        self, quic: QuicConnection, stream_handler: QuicStreamHandler | None = None
    ) -> _WebTransportProtocol:
        self.counters["connections"] += 1
        connection = _WebTransportProtocol(quic, server=self)
        self._connections.add(connection)
        return connection

    def _forget(self, connection: _WebTransportProtocol) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            if connection.host is not None:
                left = self._per_host.get(connection.host, 1) - 1
                if left > 0:
                    self._per_host[connection.host] = left
                else:
                    self._per_host.pop(connection.host, None)

    def _counted(self, host: str) -> None:
        """A new connection's first datagram came from ``host``."""
        self._per_host[host] = self._per_host.get(host, 0) + 1

    def _full(self, host: str) -> bool:
        limit = self.max_connections_per_address
        return limit is not None and self._per_host.get(host, 0) >= limit


class _Listener(QuicServer):
    """aioquic's endpoint for one socket; drops a new handshake from a host that holds too many.

    asyncio reads one datagram per wake-up of the loop (a poll of the selector, a callback); a
    loaded socket holds many, so each wake-up goes on reading, up to :data:`READ_BATCH`, and the
    connections answer (ACKs, replies) once the batch is in (``_WebTransportProtocol``).
    """

    def __init__(self, *, owner: Server, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner
        self._sock = sock

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._one(data, addr)
        sock = self._sock
        for _ in range(READ_BATCH - 1):
            if self._transport is None or self._transport.is_closing():
                return
            try:
                data, addr = sock.recvfrom(_RECV_SIZE)
            except OSError:  # nothing more to read (or an error asyncio's own read reports)
                return
            self._one(data, addr)

    def _one(self, data: bytes | str, addr: Any) -> None:
        if (
            isinstance(data, bytes)
            and self._owner._full(str(addr[0]))
            and self._starts_connection(data)
        ):
            self._owner.counters["connections_refused"] += 1
            return
        super().datagram_received(data, addr)

    def _starts_connection(self, data: bytes) -> bool:
        """Would aioquic create a connection for this datagram (an Initial for an unknown ID)?"""
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._configuration.connection_id_length
            )
        except ValueError:
            return False
        return (
            header.packet_type == QuicPacketType.INITIAL
            and header.destination_cid not in self._protocols
        )


class _ImpairedTransport:
    """The shared UDP socket as one connection sees it: what it sends goes through a line."""

    def __init__(self, raw: asyncio.DatagramTransport, line: DelayLine[tuple[bytes, Any]]) -> None:
        self._raw = raw
        self._line = line

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._line.push((data, addr), len(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _WebTransportProtocol(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 events in, session callbacks out."""

    def __init__(self, quic: QuicConnection, *, server: Server) -> None:
        super().__init__(quic)
        # aioquic acknowledges 1 ms after a packet (K_GRANULARITY) although it tells the peer it
        # may wait max_ack_delay (25 ms): each report of a 60 fps page got an ACK of its own, a
        # timer and a packet sent. See ACK_DELAY.
        quic._ack_delay = ACK_DELAY
        self.sessions: dict[int, WebTransportSession] = {}
        self._server = server
        self._counters = server.counters
        self._h3: H3Connection | None = None
        self._peer: tuple[Any, ...] = ()
        self._stream_session: dict[int, int] = {}
        self._capsules: dict[int, wire.CapsuleReader] = {}
        self._answered: set[int] = set()
        self._detached = False
        self._inbound: DelayLine[tuple[bytes | str, Any]] | None = None
        self._outbound: DelayLine[tuple[bytes, Any]] | None = None
        self._raw_transport: asyncio.DatagramTransport | None = None
        self.host: str | None = None
        "The client's host, once its first datagram came (for the per-address limit)."
        self._linger: asyncio.TimerHandle | None = self._loop.call_later(
            REQUEST_TIMEOUT, self._no_request
        )

    # asyncio / aioquic glue

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self._peer:
            self._peer = tuple(addr)
            self.host = str(addr[0])
            self._server._counted(self.host)
        if self._inbound is not None:
            self._inbound.push((data, addr), len(data))
        else:
            # aioquic's datagram_received transmits at once; here the reply (mostly an ACK, and
            # the timer re-armed) waits for the end of the listener's batch, one for all of this
            # connection's packets in it.
            self._quic.receive_datagram(cast(bytes, data), addr, now=self._loop.time())
            self._process_events()
            self._transmit_soon()

    def _received_late(self, item: tuple[bytes | str, Any]) -> None:
        """A client's datagram, out of the emulated network."""
        if not self._detached:
            super().datagram_received(*item)

    def impair(self, reports: Path, results: Path, seed: int | None) -> None:
        """See ``WebTransportSession.impair``.

        A second call (a live change) retargets the lines in place: what they hold is already
        on the wire and arrives as the old network said, what comes next takes the new one, in
        order, and the counts go on. A line stays once made, passing packets straight through
        when its path turns clear.
        """
        rng = random.Random(seed)
        if self._inbound is not None:
            self._inbound.link.path = reports
        elif not reports.is_clear:
            link = Link(reports, random.Random(rng.random()))
            self._inbound = DelayLine(link, self._received_late)
        if self._outbound is not None:
            self._outbound.link.path = results
        elif not results.is_clear:
            raw = self._raw_transport = self._raw_transport or self._transport
            assert raw is not None  # a connection that received a datagram has its socket
            out: DelayLine[tuple[bytes, Any]] = DelayLine(
                Link(results, random.Random(rng.random())), self._sent_late
            )
            self._outbound = out
            self._transport = cast(asyncio.DatagramTransport, _ImpairedTransport(raw, out))

    def _sent_late(self, item: tuple[bytes, Any]) -> None:
        """A datagram of ours, out of the emulated network. The server may have closed its
        sockets while it was on the emulated wire (a shutdown under a 270 ms profile): then it
        is lost, as it would be on a real network, rather than written to a closed socket."""
        raw = self._raw_transport
        if raw is not None and not raw.is_closing():
            raw.sendto(*item)

    def impairment_counts(self) -> tuple[Counts, Counts] | None:
        if self._inbound is None and self._outbound is None:
            return None
        return (
            self._inbound.link.counts if self._inbound else Counts(),
            self._outbound.link.counts if self._outbound else Counts(),
        )

    def transmit(self) -> None:
        # Once the server closed its sockets, a late timer must not write to them.
        if not self._detached:
            super().transmit()

    def quic_event_received(self, event: QuicEvent) -> None:
        # An exception escaping here would leave aioquic mid-batch; contain it to this connection.
        try:
            self._quic_event(event)
        except Exception:
            self._counters["internal_errors"] += 1
            log.exception("WebTransport connection from %s failed; closing it", self._peer)
            self._end_sessions("internal error")
            self._quic.close(error_code=ErrorCode.H3_INTERNAL_ERROR, reason_phrase="internal")

    def _quic_event(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN and self._h3 is None:
                self._h3 = H3Connection(self._quic, enable_webtransport=True)
        elif isinstance(event, ConnectionTerminated):
            if event.error_code in wire.HTTP3_ERROR_CODES and event.frame_type is None:
                self._counters["h3_errors"] += 1
            phrase = f": {event.reason_phrase}" if event.reason_phrase else ""
            self._end_sessions(f"connection closed (error {event.error_code:#x}{phrase})")
            self._cancel_linger()
            if self._inbound is not None:  # nothing more to read; what leaves drains by itself
                self._inbound.close()
            self._server._forget(self)
            return
        elif isinstance(event, StreamReset):
            self._stream_reset(event)
        if self._h3 is not None:
            for h3_event in self._h3.handle_event(event):
                self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, WebTransportStreamDataReceived):
            session = self.sessions.get(event.session_id)
            if session is None:
                return
            if event.stream_ended:
                self._stream_session.pop(event.stream_id, None)
            else:
                self._stream_session[event.stream_id] = event.session_id
            data, sid, ended = event.data, event.stream_id, event.stream_ended
            self._deliver(session, lambda h: h.stream_data(sid, data, ended))
        elif isinstance(event, DatagramReceived):
            session = self.sessions.get(event.stream_id)
            if session is None:
                self._counters["datagrams_unrouted"] += 1
            else:
                self._counters["datagrams_in"] += 1
                data = event.data
                self._deliver(session, lambda h: h.datagram(data))
        elif isinstance(event, HeadersReceived):
            if event.stream_id not in self._answered:  # else trailers: nothing to answer
                self._request(event)
        elif isinstance(event, DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                self._connect_stream_data(session, event)

    # sessions

    def _request(self, event: HeadersReceived) -> None:
        stream_id = event.stream_id
        if len(self._answered) >= MAX_REQUESTS:
            # Chromium makes one request per connection; this many is abuse.
            self._end_sessions("too many requests")
            self._quic.close(
                error_code=ErrorCode.H3_EXCESSIVE_LOAD, reason_phrase="too many requests"
            )
            return
        self._answered.add(stream_id)
        headers = wire.header_map(event.headers)
        path, _, query = headers.get(":path", "").partition("?")
        if path != self._server.path:
            self._refuse(stream_id, 404, "not found")
        elif headers.get(":method") != "CONNECT":
            self._refuse(stream_id, 405, "only CONNECT :protocol webtransport")
        elif headers.get(":protocol") != "webtransport":
            self._refuse(stream_id, 400, "only CONNECT :protocol webtransport")
        elif event.stream_ended:
            self._refuse(stream_id, 400, "the CONNECT stream ended")
        else:
            session = WebTransportSession(
                self,
                stream_id,
                path=path,
                query=dict(urllib.parse.parse_qsl(query, keep_blank_values=True)),
                origin=headers.get("origin"),
                authority=headers.get(":authority", ""),
                peer=self._peer,
            )
            try:
                decision = self._server._accept(session, MappingProxyType(headers))
            except Exception:
                self._counters["handler_errors"] += 1
                log.exception("accept() failed for %s", session)
                decision = (500, "internal error")
            if isinstance(decision, tuple):
                status, reason = decision
                if not 300 <= status <= 599:
                    log.error("accept() refused %s with status %s; sending 500", session, status)
                    status, reason = 500, "internal error"
                self._refuse(stream_id, status, reason)
            elif session.is_closed:  # accept() closed it before answering
                self._refuse(stream_id, 503, "closed during accept")
            else:
                self._open(session, decision)

    def _refuse(self, stream_id: int, status: int, reason: str) -> None:
        assert self._h3 is not None
        self._counters["sessions_refused"] += 1
        self._h3.send_headers(
            stream_id,
            [(b":status", str(status).encode()), (b"content-type", b"text/plain; charset=utf-8")],
        )
        self._h3.send_data(stream_id, reason.encode()[:_MAX_REFUSAL_BODY], end_stream=True)
        self.transmit()
        self._linger_if_idle()

    def _open(self, session: WebTransportSession, handler: SessionHandler) -> None:
        assert self._h3 is not None
        session._handler = handler
        self.sessions[session.session_id] = session
        self._capsules[session.session_id] = wire.CapsuleReader()
        self._cancel_linger()
        self._counters["sessions_accepted"] += 1
        self._h3.send_headers(
            session.session_id,
            [(b":status", b"200"), wire.DRAFT02_RESPONSE_HEADER],
        )
        self.transmit()

    def _connect_stream_data(self, session: WebTransportSession, event: DataReceived) -> None:
        reader = self._capsules[session.session_id]
        reader.feed(event.data)  # what matters is the close, which the reader keeps
        if event.stream_ended:
            self._finish(session, wire.close_reason("client", reader.close), send_fin=True)

    def _stream_reset(self, event: StreamReset) -> None:
        stream_id, code = event.stream_id, event.error_code
        session = self.sessions.get(stream_id)
        if session is not None:
            self._finish(session, f"CONNECT stream reset (error {code:#x})")
            return
        session_id = self._stream_session.pop(stream_id, None)
        if session_id is not None and (session := self.sessions.get(session_id)) is not None:
            self._deliver(session, lambda h: h.stream_data(stream_id, b"", True))

    def close_session(self, session: WebTransportSession, code: int, reason: str) -> None:
        assert self._h3 is not None
        capsule = wire.encode_close(code, reason)
        try:
            self._h3.send_data(session.session_id, capsule, end_stream=True)
            self.transmit()
        except (FrameUnexpected, ValueError):  # the CONNECT stream already ended
            pass
        self._finish(session, wire.close_reason("server", wire.SessionClose(code, reason)))

    def _finish(self, session: WebTransportSession, reason: str, send_fin: bool = False) -> None:
        """Forget the session and tell the application, once."""
        if session._closed:
            return
        session._closed = True
        self.sessions.pop(session.session_id, None)
        self._capsules.pop(session.session_id, None)
        self._counters["sessions_closed"] += 1
        if send_fin and self._h3 is not None:
            # The client ended its side; end ours so the stream is released.
            try:
                self._h3.send_data(session.session_id, b"", end_stream=True)
                self.transmit()
            except (FrameUnexpected, ValueError):  # already ended or reset
                pass
        self._deliver(session, lambda h: h.closed(reason), closing=True)
        session._handler = None  # the application's handler refers back: free both at once
        self._linger_if_idle()

    def _end_sessions(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            self._finish(session, reason)

    def _deliver(
        self,
        session: WebTransportSession,
        call: Callable[[SessionHandler], None],
        closing: bool = False,
    ) -> None:
        """Call the application; if it raises, log it and end that session only."""
        handler = session._handler
        if handler is None or (session._closed and not closing):
            return
        try:
            call(handler)
        except Exception:
            self._counters["handler_errors"] += 1
            log.exception("%s failed for %s", type(handler).__name__, session)
            if not session._closed:
                self.close_session(session, 1, "internal error")

    # writes

    def send_stream(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream)
        self.transmit()

    def datagram_room(self) -> int:
        """Datagrams aioquic takes before its queue reaches ``MAX_PENDING_DATAGRAMS``."""
        if self._h3 is None:
            return 0
        return max(0, MAX_PENDING_DATAGRAMS - wire.datagrams_queued(self._quic))

    def send_datagram(self, session: WebTransportSession, data: bytes) -> bool:
        if len(data) > MAX_DATAGRAM_PAYLOAD:
            self._counters["datagrams_oversize"] += 1
            return False
        # aioquic queues datagrams without limit while the congestion window is full.
        if session._closed or self._h3 is None or self.datagram_room() == 0:
            self._counters["datagrams_dropped"] += 1
            return False
        self._h3.send_datagram(session.session_id, data)
        self._counters["datagrams_out"] += 1
        self.transmit()
        return True

    # connection lifetime

    def shutdown(self, reason: str) -> None:
        """End all sessions and the connection, then stop writing to the server's sockets."""
        self._end_sessions(reason)
        self._cancel_linger()
        self._quic.close(error_code=ErrorCode.H3_NO_ERROR, reason_phrase=reason)
        self.transmit()
        self._detached = True

    def _linger_if_idle(self) -> None:
        if not self.sessions and not self._detached:
            self._cancel_linger()
            self._linger = self._loop.call_later(LINGER, self._close_if_idle)

    def _no_request(self) -> None:
        if not self._answered:
            self._counters["connections_no_request"] += 1
        self._close_if_idle()

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _close_if_idle(self) -> None:
        self._linger = None
        if not self.sessions:
            self._quic.close(error_code=ErrorCode.H3_NO_ERROR, reason_phrase="no session")
            self.transmit()


async def serve(
    hosts: Sequence[str],
    port: int,
    cert: CertBundle,
    accept: Accept,
    *,
    path: str = "/wt",
    max_datagram_frame_size: int = 65536,
    idle_timeout: float = 30.0,
    retry: bool = False,
    max_connections_per_address: int | None = None,
) -> Server:
    """Listen for WebTransport on every address of every host, all on the same UDP port.

    ``port=0`` picks a free port on the first address and uses it for the others. IPv6 sockets
    are v6-only, so ``["0.0.0.0", "::"]`` binds both families. ``retry`` makes clients prove
    their address first (one more round trip; protects against spoofed-source floods).
    ``max_connections_per_address``: QUIC connections one client host may hold at once; its
    further handshakes are dropped unanswered (None: no limit).
    """
    if not path.startswith("/"):
        raise ValueError("path must start with /")
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        # Without this transport parameter Chromium opens sessions whose datagrams never arrive.
        max_datagram_frame_size=max_datagram_frame_size,
        idle_timeout=idle_timeout,
    )
    load_into(configuration, cert)
    server = Server(configuration, cert, accept, path, max_connections_per_address)
    loop = asyncio.get_running_loop()
    try:
        for address in await _resolve(hosts, port):
            if port == 0 and server.addresses:
                address = (address[0], server.port, *address[2:])
            sock = _bind(address)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(
                    _Listener,
                    owner=server,
                    sock=sock,
                    configuration=configuration,
                    create_protocol=server._create_protocol,
                    retry=retry,
                ),
                sock=sock,
            )
            server._transports.append(transport)
            server.addresses.append(tuple(sock.getsockname()))
    except BaseException:
        server.close()
        raise
    log.info("WebTransport on %s, path %s", server.addresses, path)
    return server


async def _resolve(hosts: Sequence[str], port: int) -> list[tuple[Any, ...]]:
    """Every distinct UDP address of ``hosts`` (a name such as localhost may give two)."""
    if not hosts:
        raise ValueError("no host to listen on")
    loop = asyncio.get_running_loop()
    addresses: list[tuple[Any, ...]] = []
    for host in hosts:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        for _family, _type, _proto, _name, sockaddr in infos:
            if tuple(sockaddr) not in addresses:
                addresses.append(tuple(sockaddr))
    return addresses


def _bind(address: tuple[Any, ...]) -> socket.socket:
    family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
