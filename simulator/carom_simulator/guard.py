"""What the simulator accepts from the network before it does any work for a request.

Two gates, both before a session costs anything:

- **The router's token.** The session API (offer, list, delete) answers only a request that
  carries ``Authorization: Bearer <access.token>``. Found open (issue 14): anyone who reached the
  port could list every session and ``DELETE`` someone else's, whose video then stopped. The
  check runs on the headers alone, so a refused request never gets its body read. ``/health``
  and ``/metrics`` stay open for probes and Prometheus.
- **Bounded bodies.** A body is read chunk by chunk and refused (413) as soon as it passes the
  limit, and refused at once if its ``Content-Length`` already does; a body that does not arrive
  in time is refused (408). Found (issue 14): 10 MB bodies read whole before the size check took
  the simulator's RSS from 145 to 190 MB, for good.

A refusal is answered at once, and the connection closed after a bounded *lingering close*
(``refuse``, as nginx does): the rest of the unread body is read and dropped for at most
``LINGER_S``, then the connection is closed. Closing at once lost the answer for an asyncio
client still sending (httpx, as the router uses): its write failed and took the connection's
reads with it (measured: 20 of 20 refused 10 MB offers ended in ReadError, none saw the 413).
Keeping the connection open instead let uvicorn drain a body that never ends for as long as it
was sent (measured: 30 s of a chunked stream, still open).

``TokenCheck``, ``declared_length`` and ``BodyBuffer`` are pure (no I/O, no clock) and tested in
memory; ``BearerGate``, ``refuse`` and ``read_body`` are the thin ASGI / asyncio shells.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing
from typing import Literal

import msgspec
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

#: Paths any client may ask without the token: the probes (k8s, compose) and Prometheus.
OPEN_PATHS = frozenset({"/health", "/metrics"})
#: Seconds a refused request's unread body is read and dropped after the answer, before the
#: connection is closed: ample for a client on a LAN to finish sending and read the answer.
LINGER_S = 2.0

Verdict = Literal["ok", "missing", "wrong"]


class TokenCheck:
    """Whether an ``Authorization`` header carries the expected bearer token.

    Both sides are hashed before the constant-time comparison, so neither the time taken nor an
    early exit on a length mismatch tells a caller how much of a guess was right.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in")
        self._digest = hashlib.sha256(token.encode("ascii")).digest()

    def verdict(self, authorization: bytes | None) -> Verdict:
        """``ok``, ``missing`` (no bearer credentials at all) or ``wrong``."""
        if authorization is None:
            return "missing"
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not credentials.strip():
            return "missing"
        given = hashlib.sha256(credentials.strip()).digest()
        return "ok" if hmac.compare_digest(given, self._digest) else "wrong"


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case, as ASGI gives them), or None."""
    return next((value for key, value in headers if key == name), None)


def problem_body(detail: str) -> bytes:
    """The JSON problem body every refusal of the simulator uses: ``{"detail": ...}``."""
    return msgspec.json.encode({"detail": detail})


async def refuse(
    receive: Receive,
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    linger_s: float = LINGER_S,
) -> None:
    """Answer ``status`` now, drop what is left of the request body for ``linger_s``, close.

    Only for a request whose body was not read to its end (else there is nothing to wait for).
    The answer goes out whole at once; the response is completed (and the connection closed,
    ``Connection: close``) only after the client finished sending or ``linger_s`` passed. No
    byte of the dropped body is kept.
    """
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": True})
    try:
        async with asyncio.timeout(linger_s):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
    except TimeoutError:
        pass  # still sending after linger_s: not a client we owe more time
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class Refusal(Response):
    """A JSON problem answered by ``refuse``: for a route that stops before reading its body."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(problem_body(detail), status, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await refuse(receive, send, self.status_code, bytes(self.body))


class BearerGate:
    """ASGI middleware: every path but ``OPEN_PATHS`` needs the token, or gets a 401.

    Deny by default: a route added later (or FastAPI's own ``/docs``) is protected without anyone
    remembering to. ``on_refused`` is called with ``missing`` or ``wrong`` for /metrics.
    """

    def __init__(
        self,
        app: ASGIApp,
        check: TokenCheck,
        on_refused: Callable[[Verdict], None],
        open_paths: frozenset[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.check = check
        self.on_refused = on_refused
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        verdict = self.check.verdict(header(scope["headers"], b"authorization"))
        if verdict == "ok":
            await self.app(scope, receive, send)
            return
        self.on_refused(verdict)
        detail = (
            "no access token: send 'Authorization: Bearer <token>' with the simulator's "
            "access.token (the router's simulator.token)"
            if verdict == "missing"
            else "wrong access token (it must be the simulator's access.token)"
        )
        challenge = b'Bearer realm="carom-simulator"'
        if verdict == "wrong":
            challenge += b', error="invalid_token"'
        # Its body, if any, is never read: dropped while lingering, then the connection closes.
        await refuse(receive, send, 401, problem_body(detail), [(b"www-authenticate", challenge)])


class BodyError(Exception):
    """A request body refused before or while it was read; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


def declared_length(headers: Iterable[tuple[bytes, bytes]], limit: int) -> int | None:
    """The body's ``Content-Length`` (None when chunked); BodyError if bad or over ``limit``.

    Checked before reading a byte: a client that announces 10 MB is refused at once.
    """
    raw = header(headers, b"content-length")
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or len(text) > 18:
        raise BodyError(400, "bad_length", f"invalid Content-Length {raw[:40]!r}")
    length = int(text)
    if length > limit:
        raise BodyError(413, "oversize", f"request body of {length} bytes is over {limit} bytes")
    return length


class BodyBuffer:
    """Collects a body's chunks and refuses the one that takes it past ``limit`` bytes.

    It never holds more than ``limit`` bytes: the chunk that would cross the limit is counted,
    not kept.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self._chunks.clear()
            raise BodyError(413, "oversize", f"request body is over {self.limit} bytes")
        if chunk:
            self._chunks.append(chunk)

    def take(self) -> bytes:
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body


async def read_body(
    chunks: AsyncGenerator[bytes, None],
    headers: Iterable[tuple[bytes, bytes]],
    limit: int,
    timeout_s: float,
) -> bytes:
    """The whole body of at most ``limit`` bytes, received within ``timeout_s``; else BodyError.

    ``chunks`` is the request's stream (Starlette's ``Request.stream()``), read as it arrives.
    The timeout bounds a body sent a byte at a time: it would hold a connection and its buffer
    for as long as the sender liked.
    """
    declared_length(headers, limit)
    buffer = BodyBuffer(limit)
    try:
        async with asyncio.timeout(timeout_s), aclosing(chunks):
            async for chunk in chunks:
                buffer.add(chunk)
    except TimeoutError:
        raise BodyError(
            408, "body_timeout", f"request body not received within {timeout_s:g} s"
        ) from None
    return buffer.take()
