"""Typed channels: what a client sends beside its reports (camera, microphone, screen, chat,
point clouds), how it is framed on WebTransport, how it is routed, and what lands on Pulsar.

Written once here for the page, the Python client, the router, the recorder and the CLI
(docs/channels.md is the prose). Pure: bytes in, values out.

**On the wire** (client -> router) every channel message is one *frame*, the same bytes on a
stream or in a datagram::

    u8  version (1)        u8 kind (3: a channel message; reports are kind 1)
    u8  n                  n bytes: the type's name, ASCII [a-z][a-z0-9_]{0,31}
    u64 seq                the sender's sequence number for this type in this session, from 0
    u32 m                  the body's length; the body follows:
        f64 t_capture_ms   when it was captured, on the client's clock (epoch ms, as the page's
                           ``performance.timeOrigin + performance.now()``); NaN when unknown
        u16 k              k bytes: a UTF-8 JSON object, the message's meta (k = 0: ``{}``)
        ...                the payload: m - 10 - k bytes

All integers big-endian. The type, seq and length come before the body so the router can refuse
a message (unknown type, over its route's size) without buffering it: it skips ``m`` bytes and
still knows which sequence number it refused. A client opens one unidirectional stream per type
(ordered, reliable, independent of the other types) and writes its frames back to back; a frame
may be split across reads anywhere (``ChannelReader``).

**Formats** (a route says which one its type carries; the router checks it before publishing):

- ``video``: one encoded video chunk (WebCodecs ``EncodedVideoChunk``). Meta: ``codec``
  (``h264`` Annex B, ``vp8``, ``vp9`` or ``av1``), ``key`` (bool), ``timestamp_us`` (int),
  optional ``duration_us``, ``width``, ``height``.
- ``audio``: one encoded audio chunk (``EncodedAudioChunk``). Meta: ``codec`` (``opus``),
  ``timestamp_us``, ``sample_rate``, ``channels``, optional ``duration_us``.
- ``text``: a UTF-8 message (chat). No meta needed.
- ``points``: ``count`` float32 ``x, y, z`` triples, little-endian (NumPy's ``<f4``, shape
  ``(count, 3)``): the payload is exactly ``12 * count`` bytes. Meta: ``count``.
- ``bytes``: anything; the router checks only its size.

**On Pulsar** each accepted message becomes a ``ChannelMessage`` (msgpack), keyed by session, on
its type's topic; when the session ends, a ``ChannelEnd`` per type it used follows on the same
key, saying which sequence numbers the router accepted and which it refused, so a consumer can
prove every accepted message arrived exactly once and name every one that did not.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

VERSION: Final = 1
#: The datagram/frame kind of a channel message (``carom.protocol``: 1 report, 2 result).
KIND_CHANNEL: Final = 3
TYPE_PATTERN: Final = r"^[a-z][a-z0-9_]{0,31}$"
_TYPE_RE: Final = re.compile(TYPE_PATTERN)
_HEAD_START: Final = struct.Struct(">BBB")  # version, kind, name length
_HEAD_END: Final = struct.Struct(">QI")  # seq, body length
_BODY_HEAD: Final = struct.Struct(">dH")  # t_capture_ms, meta length
#: Bytes of a frame before the type's name and after it, up to the body.
HEAD_FIXED: Final = _HEAD_START.size + _HEAD_END.size
BODY_FIXED: Final = _BODY_HEAD.size
MAX_META_BYTES: Final = 4096
#: No route may allow more than this per message (the body length is a u32; a route's own
#: ``max_message_bytes`` is what a session meets).
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
MAX_SEQ: Final = 2**53
#: ``ChannelEnd.refused_seqs`` lists at most this many (``refused`` counts them all).
MAX_LISTED_SEQS: Final = 10_000
#: The points format: little-endian float32 x, y, z.
POINT_BYTES: Final = 12
MAX_POINTS: Final = 1_000_000

Format = Literal["video", "audio", "text", "points", "bytes"]
Overflow = Literal["refuse", "spool", "close"]
TypeName = Annotated[str, Meta(pattern=TYPE_PATTERN, description="a channel type's name")]
SessionId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
EpochNs = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Seq = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
VIDEO_CODECS: Final = frozenset({"h264", "vp8", "vp9", "av1"})
AUDIO_CODECS: Final = frozenset({"opus"})


class ChannelError(ValueError):
    """A channel message or a routes file is not valid; ``code`` is the short reason counted
    and told to the client (``unknown_type``, ``over_limit``, ``bad_format``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- frames ---------------------------------------------------------------------------------------


def encode_frame(
    type_: str,
    seq: int,
    t_capture_ms: float,
    payload: bytes = b"",
    meta: dict[str, Any] | None = None,
) -> bytes:
    """One channel message as wire bytes (the page's ``encodeChannelFrame`` writes the same)."""
    if not _TYPE_RE.match(type_):
        raise ChannelError("bad_type", f"type name {type_!r} is not {TYPE_PATTERN}")
    if not 0 <= seq <= MAX_SEQ:
        raise ChannelError("bad_seq", f"seq {seq} out of range")
    meta_bytes = msgspec.json.encode(meta) if meta else b""
    if len(meta_bytes) > MAX_META_BYTES:
        raise ChannelError("bad_meta", f"meta of {len(meta_bytes)} bytes (max {MAX_META_BYTES})")
    name = type_.encode()
    body_len = BODY_FIXED + len(meta_bytes) + len(payload)
    return b"".join(
        (
            _HEAD_START.pack(VERSION, KIND_CHANNEL, len(name)),
            name,
            _HEAD_END.pack(seq, body_len),
            _BODY_HEAD.pack(t_capture_ms, len(meta_bytes)),
            meta_bytes,
            payload,
        )
    )


@dataclass(frozen=True, slots=True)
class Head:
    """What comes before a frame's body: enough to route it, or to refuse it unread."""

    type: str
    seq: int
    length: int
    "The body's length in bytes."


@dataclass(frozen=True, slots=True)
class Frame:
    """One channel message, parsed (its meta still unchecked against a format)."""

    type: str
    seq: int
    t_capture_ms: float
    meta: dict[str, Any]
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.payload)


def parse_head(data: bytes | bytearray | memoryview, start: int = 0) -> tuple[Head, int] | None:
    """The head at ``start`` and where its body begins, or None if more bytes are needed.

    Raises ``ChannelError`` (``bad_frame``) when the bytes cannot be a frame's head.
    """
    if len(data) - start < _HEAD_START.size:
        return None
    version, kind, n = _HEAD_START.unpack_from(data, start)
    if version != VERSION or kind != KIND_CHANNEL:
        raise ChannelError("bad_frame", f"not a channel frame (version {version}, kind {kind})")
    if not 1 <= n <= 32:
        raise ChannelError("bad_frame", f"type name of {n} bytes")
    end = start + _HEAD_START.size + n + _HEAD_END.size
    if len(data) < end:
        return None
    raw = bytes(data[start + _HEAD_START.size : start + _HEAD_START.size + n])
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ChannelError("bad_frame", f"type name {raw!r} is not ASCII") from None
    if not _TYPE_RE.match(name):
        raise ChannelError("bad_frame", f"type name {name!r} is not {TYPE_PATTERN}")
    seq, length = _HEAD_END.unpack_from(data, end - _HEAD_END.size)
    if seq > MAX_SEQ:
        raise ChannelError("bad_frame", f"seq {seq} out of range")
    if length < BODY_FIXED:
        raise ChannelError("bad_frame", f"body of {length} bytes (at least {BODY_FIXED})")
    return Head(name, seq, length), end


def parse_body(head: Head, body: bytes | memoryview) -> Frame:
    """The body of ``head``'s frame; ``bad_frame`` if its meta is not a JSON object."""
    if len(body) != head.length:
        raise ChannelError("bad_frame", f"body of {len(body)} bytes, head says {head.length}")
    t_capture_ms, k = _BODY_HEAD.unpack_from(body)
    if BODY_FIXED + k > len(body) or k > MAX_META_BYTES:
        raise ChannelError("bad_frame", f"meta of {k} bytes does not fit")
    meta: dict[str, Any] = {}
    if k:
        try:
            decoded = msgspec.json.decode(bytes(body[BODY_FIXED : BODY_FIXED + k]))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ChannelError("bad_frame", f"meta is not JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise ChannelError("bad_frame", "meta is not a JSON object")
        meta = decoded
    return Frame(head.type, head.seq, t_capture_ms, meta, bytes(body[BODY_FIXED + k :]))


def decode_frame(data: bytes) -> Frame:
    """One whole frame (a datagram): ``bad_frame`` if it is not exactly one."""
    parsed = parse_head(data)
    if parsed is None:
        raise ChannelError("bad_frame", f"truncated channel frame ({len(data)} bytes)")
    head, at = parsed
    if len(data) - at != head.length:
        raise ChannelError("bad_frame", f"frame of {len(data)} bytes, head says {at + head.length}")
    return parse_body(head, memoryview(data)[at:])


@dataclass(frozen=True, slots=True)
class Skipped:
    """A frame the reader's ``limit`` refused: its body was skipped unread."""

    head: Head
    code: str
    "``unknown_type`` or ``over_limit``."
    message: str


class ChannelReader:
    """Incremental reader of one stream's frames, which may be split across reads anywhere.

    ``limit(type) -> int | None`` gives the largest body the stream may carry for a type, or
    None for a type with no route: the reader then skips that frame's body as it arrives, never
    holding more of it than one read, and returns ``Skipped``. So a client sending an
    unknown type or an oversize message costs the router its bandwidth, not its memory.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._at = 0
        self._head: Head | None = None
        self._body_at = 0
        self._skip = 0
        self._skipped: Skipped | None = None

    @property
    def pending(self) -> int:
        """Bytes held (a partial frame)."""
        return len(self._buf) - self._at

    def push(self, data: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if data:
            if self._at and self._at >= len(self._buf) // 2:  # drop what was read, at most
                del self._buf[: self._at]  # once per half the buffer: amortised O(1) per byte
                if self._head is not None:  # a head waiting for its body: it moved too
                    self._body_at -= self._at
                self._at = 0
            self._buf += data

    def next(self, limit: Any) -> Frame | Skipped | None:
        """The next complete frame, a skipped one, or None (more bytes needed).

        ``limit``: ``Callable[[str], int | None]``. Raises ``ChannelError`` (``bad_frame``) when
        the stream holds something that is not a frame: the stream is then unusable.
        """
        if self._skipped is not None and not self._skip:
            done, self._skipped = self._skipped, None
            return done
        if self._skip:
            return None
        if self._head is None:
            parsed = parse_head(self._buf, self._at)
            if parsed is None:
                return None
            head, self._body_at = parsed
            allowed = limit(head.type)
            if allowed is None or head.length > allowed:
                if allowed is None:
                    code, why = "unknown_type", f"no route for type {head.type!r}"
                else:
                    code = "over_limit"
                    why = f"{head.type} message of {head.length} bytes (max {allowed})"
                skipped = Skipped(head, code, why)
                have = len(self._buf) - self._body_at
                take = min(have, head.length)
                self._at = self._body_at + take
                self._skip = head.length - take
                if self._skip:
                    self._skipped = skipped
                    return None
                return skipped
            self._head = head
        head = self._head
        end = self._body_at + head.length
        if len(self._buf) < end:
            return None
        body = memoryview(self._buf)[self._body_at : end]
        try:
            frame = parse_body(head, body)
        finally:
            body.release()
        self._head = None
        self._at = end
        return frame

    def clear(self) -> None:
        self._buf = bytearray()
        self._at = 0
        self._head = None
        self._skip = 0
        self._skipped = None


# --- formats --------------------------------------------------------------------------------------


def check_format(fmt: Format, frame: Frame) -> None:
    """Raise ``ChannelError("bad_format", ...)`` unless ``frame`` is a valid ``fmt`` message."""

    def bad(why: str) -> ChannelError:
        return ChannelError("bad_format", f"{frame.type} #{frame.seq}: {why}")

    meta = frame.meta
    if not (math.isnan(frame.t_capture_ms) or 0 < frame.t_capture_ms < 2**53):
        raise bad(f"t_capture_ms {frame.t_capture_ms} is not an epoch time in ms")
    if fmt in ("video", "audio"):
        codecs = VIDEO_CODECS if fmt == "video" else AUDIO_CODECS
        if meta.get("codec") not in codecs:
            raise bad(f"codec {meta.get('codec')!r} is not one of {sorted(codecs)}")
        if not _is_int(meta.get("timestamp_us")):
            raise bad("timestamp_us (int) is required")
        if not frame.payload:
            raise bad("empty chunk")
        if fmt == "video" and not isinstance(meta.get("key"), bool):
            raise bad("key (bool) is required")
        if fmt == "audio":
            for name in ("sample_rate", "channels"):
                if not (_is_int(meta.get(name)) and meta[name] > 0):
                    raise bad(f"{name} (int > 0) is required")
    elif fmt == "text":
        try:
            frame.payload.decode("utf-8")
        except UnicodeDecodeError:
            raise bad("text is not UTF-8") from None
    elif fmt == "points":
        count = meta.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_POINTS:
            raise bad(f"count (int 0..{MAX_POINTS}) is required")
        if len(frame.payload) != POINT_BYTES * count:
            raise bad(f"{len(frame.payload)} bytes for {count} points ({POINT_BYTES} each)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- routes ---------------------------------------------------------------------------------------


class Route(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where one type goes and what a session may send of it (one entry of the routes file)."""

    topic: str
    format: Format
    #: Largest body (meta + payload + 10) one message may have; a larger one is refused unread.
    max_message_bytes: Annotated[int, Meta(ge=64, le=MAX_MESSAGE_BYTES)] = 1024 * 1024
    #: Messages per second one session may send of this type (token bucket), and its burst.
    max_rate: Annotated[float, Meta(gt=0, le=100_000)] = 100.0
    burst: Annotated[float, Meta(ge=1, le=1_000_000)] | None = None
    #: Resends after the broker failed a publish (a timeout, a refused message), then given up on
    #: and recorded in the session's ``ChannelEnd.failed_seqs``.
    retries: Annotated[int, Meta(ge=0, le=100)] = 3
    #: Seconds the broker has to confirm a publish; 0: wait as long as it takes (the client
    #: resends after a reconnect), as Carom's other topics do.
    timeout_s: Annotated[float, Meta(ge=0, le=3600)] = 0.0
    #: Messages of this type waiting for the broker's confirmation in one router, beyond which
    #: ``on_overflow`` applies: ``refuse`` (the client is told, counted), ``spool`` (to disk,
    #: published in order when the broker catches up; refused only when the spool is full),
    #: ``close`` (the session is closed: the client cannot keep up with what it asked for).
    max_queue: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    on_overflow: Overflow = "spool"
    #: Whether a client may send this type as datagrams (unreliable: a datagram lost on the
    #: network is a message the router never saw; the consumer finds the gap in ``seq``).
    datagrams: bool = False

    def __post_init__(self) -> None:
        if not re.match(r"^(persistent|non-persistent)://[^/\s]+/[^/\s]+/[^/\s]+$", self.topic):
            raise ValueError(f"`topic` {self.topic!r} is not a Pulsar topic URL")

    @property
    def bucket_burst(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.max_rate)


class Routes(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The routes file: one route per type (``router/routes.yaml``)."""

    version: Literal[1] = 1
    routes: dict[TypeName, Route] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name, route in self.routes.items():
            if route.topic in seen:
                raise ValueError(
                    f"`routes` {name} and {seen[route.topic]} share topic {route.topic}: "
                    "one topic per type"
                )
            seen[route.topic] = name

    def limit(self, type_: str) -> int | None:
        route = self.routes.get(type_)
        return None if route is None else route.max_message_bytes


def parse_routes(tree: object, source: str = "routes") -> Routes:
    """A routes file's parsed YAML as ``Routes``; ``ChannelError("bad_routes")`` names the key.

    (YAML parsing is the caller's: the contract carries no YAML library.)
    """
    if not isinstance(tree, dict):
        raise ChannelError("bad_routes", f"{source}: must be a mapping with `routes`")
    routes = tree.get("routes")
    if isinstance(routes, dict):  # each route alone first, so an error names its type
        for name, entry in routes.items():
            if not isinstance(name, str) or not _TYPE_RE.match(name):
                raise ChannelError(
                    "bad_routes", f"{source}: type name {name!r} is not {TYPE_PATTERN}"
                )
            try:
                msgspec.convert(entry, Route)
            except msgspec.ValidationError as exc:
                raise ChannelError("bad_routes", f"{source}: routes.{name}: {exc}") from None
    try:
        return msgspec.convert(tree, Routes)
    except msgspec.ValidationError as exc:
        raise ChannelError("bad_routes", f"{source}: {exc}") from None


# --- on Pulsar ------------------------------------------------------------------------------------


class _Record(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    schema_version: Literal[1] = 1


class ChannelMessage(_Record, tag="channel", frozen=True, kw_only=True):
    """One accepted channel message, on its type's topic, keyed by ``session_id``.

    Times are the server clock (epoch ns) but ``t_capture_ms``, the client's own; the router
    converts it with the session's clock offset (``t_capture_ns``, within ``clock_error_ns``).
    ``t_published_ns`` is when the router handed it to Pulsar; a consumer's receive time minus
    it is the broker hop, and minus ``t_capture_ns`` the whole way.
    """

    session_id: SessionId
    type: TypeName
    format: Format
    seq: Seq
    t_capture_ms: float
    t_capture_ns: EpochNs | None
    clock_error_ns: Annotated[int, Meta(ge=0)] | None
    t_router_recv_ns: EpochNs
    t_published_ns: EpochNs
    #: 0 for the first try; n for the n-th resend after a failed publish.
    attempt: Annotated[int, Meta(ge=0, le=100)] = 0
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    payload: bytes = b""


class ChannelEnd(_Record, tag="channel_end", frozen=True, kw_only=True):
    """The router's last word on one type of one session, after its last ``ChannelMessage``.

    Every sequence number from 0 to ``last_seq`` the router saw is accepted (published),
    refused (listed here, with the client told why), failed (the broker never took it after
    ``retries``), or never reached the router (a datagram lost on the way, a stream cut).
    """

    session_id: SessionId
    type: TypeName
    accepted: Annotated[int, Meta(ge=0)]
    #: The highest seq the router saw of this type (-1: none).
    last_seq: Annotated[int, Meta(ge=-1, le=MAX_SEQ)]
    refused: Annotated[int, Meta(ge=0)] = 0
    refused_seqs: list[Seq] = msgspec.field(default_factory=list)
    failed_seqs: list[Seq] = msgspec.field(default_factory=list)
    #: Why the session ended (``bye``, ``closed: ...``).
    reason: str = ""
    t_end_ns: EpochNs = 0


Record = ChannelMessage | ChannelEnd
_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Record] = msgspec.msgpack.Decoder(Record)


def encode_record(record: Record) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> Record:
    """A channel topic's message; ``ChannelError("bad_record")`` if it is not one."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ChannelError("bad_record", f"not a channel record: {exc}") from None


def points_shape(record: ChannelMessage) -> tuple[int, int]:
    """A ``points`` message's array shape, ``(count, 3)``."""
    return (len(record.payload) // POINT_BYTES, 3)
