"""The typed channels' contract: frames, the incremental reader, formats, routes, records."""

from __future__ import annotations

import math
import struct

import pytest

from carom import channels as c

T = 1_764_000_000_000.0  # an epoch time in ms


def _video(seq: int = 0, size: int = 100, key: bool = True) -> bytes:
    meta = {"codec": "vp8", "key": key, "timestamp_us": seq * 33_333}
    return c.encode_frame("camera", seq, T, b"v" * size, meta)


def test_a_frame_round_trips_with_its_type_seq_time_meta_and_payload() -> None:
    data = c.encode_frame("chat", 7, T, "héllo".encode(), {"to": "all"})
    frame = c.decode_frame(data)
    assert frame == c.Frame("chat", 7, T, {"to": "all"}, "héllo".encode())
    # The layout the page writes by hand: version, kind, name, seq, length, then the body.
    assert data[:3] == bytes([c.VERSION, c.KIND_CHANNEL, 4]) and data[3:7] == b"chat"
    seq, length = struct.unpack_from(">QI", data, 7)
    assert (seq, length) == (7, len(data) - 19)


def test_no_meta_is_an_empty_object_and_nan_capture_time_is_kept() -> None:
    frame = c.decode_frame(c.encode_frame("chat", 0, math.nan, b"x"))
    assert frame.meta == {} and math.isnan(frame.t_capture_ms)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01\x01\x04chat", "version 1, kind 1"),  # a report's kind
        (b"\x02\x03\x04chat" + bytes(12), "version 2"),
        (b"\x01\x03\x00" + bytes(12), "type name of 0 bytes"),
        (b"\x01\x03\x04Chat" + bytes(12), "is not"),
        (b"\x01\x03\x04ch\xffa" + bytes(12), "not ASCII"),
        (b"\x01\x03\x04chat" + struct.pack(">QI", 0, 3), "body of 3 bytes"),
        (b"\x01\x03\x04chat" + struct.pack(">QI", 2**60, 10), "seq"),
    ],
)
def test_what_is_not_a_frame_head_is_named(data: bytes, why: str) -> None:
    with pytest.raises(c.ChannelError, match=why) as err:
        c.decode_frame(data + bytes(10))
    assert err.value.code == "bad_frame"


def test_a_datagram_must_be_exactly_one_frame() -> None:
    data = c.encode_frame("chat", 0, T, b"hi")
    with pytest.raises(c.ChannelError, match="truncated"):
        c.decode_frame(data[:10])
    with pytest.raises(c.ChannelError, match="head says"):
        c.decode_frame(data + b"!")
    with pytest.raises(c.ChannelError, match="head says"):
        c.decode_frame(data[:-1])


def test_meta_must_be_a_json_object_that_fits() -> None:
    head = b"\x01\x03\x04chat"
    for meta, why in ((b"[1]", "not a JSON object"), (b"{bad", "not JSON")):
        body = struct.pack(">dH", T, len(meta)) + meta
        with pytest.raises(c.ChannelError, match=why):
            c.decode_frame(head + struct.pack(">QI", 0, len(body)) + body)
    body = struct.pack(">dH", T, 50) + b"{}"
    with pytest.raises(c.ChannelError, match="does not fit"):
        c.decode_frame(head + struct.pack(">QI", 0, len(body)) + body)
    with pytest.raises(c.ChannelError, match="meta of"):
        c.encode_frame("chat", 0, T, b"", {"x": "y" * c.MAX_META_BYTES})


def test_the_encoder_refuses_bad_names_and_seqs() -> None:
    with pytest.raises(c.ChannelError, match="type name"):
        c.encode_frame("Camera", 0, T)
    with pytest.raises(c.ChannelError, match="seq"):
        c.encode_frame("camera", -1, T)


def _limit(t: str) -> int | None:
    return {"camera": 1_000, "chat": 100}.get(t)


@pytest.mark.parametrize("step", [1, 3, 7, 64, 100_000])
def test_the_reader_takes_frames_split_anywhere_and_skips_refused_ones_unread(step: int) -> None:
    frames = [
        c.encode_frame("chat", 0, T, b"a"),
        _video(0, 5_000),  # over camera's 1,000
        c.encode_frame("lidar", 0, T, b"z" * 300),  # no route
        _video(1, 500),
        c.encode_frame("chat", 1, T, b"b"),
    ]
    data = b"".join(frames)
    reader = c.ChannelReader()
    got: list[c.Frame | c.Skipped] = []
    most = 0
    for i in range(0, len(data), step):
        reader.push(data[i : i + step])
        most = max(most, reader.pending)
        while (x := reader.next(_limit)) is not None:
            got.append(x)
    assert [(type(g).__name__, g.type if isinstance(g, c.Frame) else g.head.type) for g in got] == [
        ("Frame", "chat"),
        ("Skipped", "camera"),
        ("Skipped", "lidar"),
        ("Frame", "camera"),
        ("Frame", "chat"),
    ]
    skipped = [g for g in got if isinstance(g, c.Skipped)]
    assert [(s.code, s.head.seq, s.head.length) for s in skipped] == [
        ("over_limit", 0, len(frames[1]) - c.HEAD_FIXED - len("camera")),
        ("unknown_type", 0, 300 + 10),
    ]
    assert "5" in skipped[0].message and "max 1000" in skipped[0].message
    assert reader.pending == 0
    # A refused body is never held: at most one read's worth of it, plus one small frame.
    if step < 1_000:
        assert most < 1_000 + step


def test_the_reader_fails_on_bytes_that_are_not_frames() -> None:
    reader = c.ChannelReader()
    reader.push(b"GET / HTTP/1.1\r\n")
    with pytest.raises(c.ChannelError) as err:
        reader.next(_limit)
    assert err.value.code == "bad_frame"


@pytest.mark.parametrize(
    ("fmt", "type_", "meta", "payload", "why"),
    [
        ("video", "camera", {"codec": "mpeg2", "key": True, "timestamp_us": 0}, b"x", "codec"),
        ("video", "camera", {"codec": "vp8", "key": 1, "timestamp_us": 0}, b"x", "key"),
        ("video", "camera", {"codec": "vp8", "key": True}, b"x", "timestamp_us"),
        ("video", "camera", {"codec": "vp8", "key": True, "timestamp_us": 0}, b"", "empty"),
        ("audio", "mic", {"codec": "opus", "timestamp_us": 0, "sample_rate": 48000}, b"x", "chann"),
        ("text", "chat", {}, b"\xff\xfe", "UTF-8"),
        ("points", "points", {"count": 2}, bytes(23), "23 bytes for 2 points"),
        ("points", "points", {"count": True}, b"", "count"),
        ("points", "points", {}, b"", "count"),
    ],
)
def test_formats_refuse_what_a_consumer_could_not_use(
    fmt: c.Format, type_: str, meta: dict[str, object], payload: bytes, why: str
) -> None:
    frame = c.decode_frame(c.encode_frame(type_, 3, T, payload, meta))
    with pytest.raises(c.ChannelError, match=why) as err:
        c.check_format(fmt, frame)
    assert err.value.code == "bad_format" and f"{type_} #3" in str(err.value)


def test_valid_messages_of_every_format_pass() -> None:
    ok = [
        ("video", _video()),
        ("audio", c.encode_frame("mic", 0, T, b"o", {"codec": "opus", "timestamp_us": 0,
                                                      "sample_rate": 48_000, "channels": 1})),
        ("text", c.encode_frame("chat", 0, T, b"hi")),
        ("points", c.encode_frame("points", 0, T, bytes(24), {"count": 2})),
        ("bytes", c.encode_frame("blob", 0, math.nan, b"")),
    ]  # fmt: skip
    for fmt, data in ok:
        c.check_format(fmt, c.decode_frame(data))  # type: ignore[arg-type]
    with pytest.raises(c.ChannelError, match="epoch"):
        c.check_format("text", c.decode_frame(c.encode_frame("chat", 0, -5.0, b"")))


def test_the_default_routes_file_is_valid() -> None:
    import yaml

    from tests.test_architecture import ROOT

    routes = c.parse_routes(yaml.safe_load((ROOT / "router" / "routes.yaml").read_text()))
    assert set(routes.routes) == {"camera", "screen", "microphone", "chat", "points"}
    assert routes.routes["points"].max_message_bytes >= 100_000 * c.POINT_BYTES + 64
    assert routes.limit("chat") == 16_384 and routes.limit("nope") is None
    assert routes.routes["chat"].bucket_burst == 40 and routes.routes["camera"].bucket_burst == 120


@pytest.mark.parametrize(
    ("tree", "why"),
    [
        ([], "must be a mapping"),
        ({"routes": {"Chat": {"topic": "persistent://a/b/c", "format": "text"}}}, "type name"),
        ({"routes": {"chat": {"topic": "chat", "format": "text"}}}, "routes.chat: `topic`"),
        ({"routes": {"chat": {"topic": "persistent://a/b/c"}}}, "routes.chat: .*format"),
        ({"routes": {"chat": {"topic": "persistent://a/b/c", "format": "text", "max_rate": 0}}},
         "routes.chat: .*max_rate"),
        ({"routes": {"chat": {"topic": "persistent://a/b/c", "format": "text", "colour": 1}}},
         "routes.chat: .*colour"),
        ({"routes": {"a": {"topic": "persistent://a/b/c", "format": "text"},
                     "b": {"topic": "persistent://a/b/c", "format": "text"}}},
         "one topic per type"),
        ({"version": 2, "routes": {}}, "version"),
    ],
)  # fmt: skip
def test_a_bad_routes_file_is_refused_naming_the_key(tree: object, why: str) -> None:
    with pytest.raises(c.ChannelError, match=why) as err:
        c.parse_routes(tree, "routes.yaml")
    assert err.value.code == "bad_routes" and "routes.yaml" in str(err.value)


def test_records_round_trip_and_garbage_is_refused() -> None:
    msg = c.ChannelMessage(
        session_id="s-1", type="points", format="points", seq=4, t_capture_ms=T,
        t_capture_ns=int(T * 1e6), clock_error_ns=100, t_router_recv_ns=1, t_published_ns=2,
        meta={"count": 1}, payload=bytes(12),
    )  # fmt: skip
    end = c.ChannelEnd(session_id="s-1", type="points", accepted=4, last_seq=5, refused=1,
                       refused_seqs=[2], reason="bye")  # fmt: skip
    assert c.decode_record(c.encode_record(msg)) == msg
    assert c.decode_record(c.encode_record(end)) == end
    assert c.points_shape(msg) == (1, 3)
    with pytest.raises(c.ChannelError) as err:
        c.decode_record(b'{"kind":"channel"}')
    assert err.value.code == "bad_record"


def test_the_reader_keeps_its_place_when_it_compacts_mid_frame() -> None:
    """Found end to end (a page's camera stream): a body arriving in pieces after the reader
    dropped what it had read used to be read from the wrong place (``meta of 20242 bytes``)."""
    frames = [_video(i, 700 + 13 * i) for i in range(40)]
    data = b"".join(frames)
    reader = c.ChannelReader()
    got: list[c.Frame] = []
    limit = {"camera": 10_000}.get
    for i in range(0, len(data), 1_000):
        reader.push(data[i : i + 1_000])
        while (x := reader.next(limit)) is not None:
            assert isinstance(x, c.Frame), x
            got.append(x)
    assert [(f.seq, f.size) for f in got] == [(i, 700 + 13 * i) for i in range(40)]
