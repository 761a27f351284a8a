"""The router's per-session channel core (``carom_router.channels``), in memory."""

from __future__ import annotations

import math
import random
import struct

import pytest

from carom import channels as ch
from carom import protocol as p
from carom_router import channels as core

NS = 1_000_000_000
T0 = 1_800_000_000 * NS
T_MS = T0 / 1e6


def routes(**over: object) -> ch.Routes:
    tree: dict[str, object] = {
        "routes": {
            "chat": {
                "topic": "persistent://public/default/t-chat",
                "format": "text",
                "max_message_bytes": 1024,
                "max_rate": 10,
                "burst": 5,
            },
            "points": {
                "topic": "persistent://public/default/t-points",
                "format": "points",
                "max_message_bytes": 16 * 1024 * 1024,
            },
            "camera": {
                "topic": "persistent://public/default/t-camera",
                "format": "video",
                "datagrams": True,
            },
            **over,
        }
    }
    return ch.parse_routes(tree)


def session(r: ch.Routes | None = None) -> core.SessionChannels:
    return core.SessionChannels(r or routes(), "s1")


def clock(offset_ms: float = 0.0) -> p.ClockOffset:
    c = p.ClockOffset()
    # A pong answered at once: the client's clock reads server - offset.
    c.add(T0, (T0 / 1e6) - offset_ms, T0)
    return c


def chat(seq: int, text: str = "hi", t_ms: float = T_MS) -> bytes:
    return ch.encode_frame("chat", seq, t_ms, text.encode())


def kinds(actions: list[core.ChannelAction]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_a_chat_message_is_published_with_the_server_clocks_capture_time() -> None:
    s = session()
    out = s.stream(2, chat(0, "hello"), False, T0 + 5_000_000, clock(offset_ms=250.0))
    assert kinds(out) == ["PublishChannel"]
    a = out[0]
    assert isinstance(a, core.PublishChannel)
    msg = a.message
    assert a.route.topic == "persistent://public/default/t-chat"
    assert (msg.session_id, msg.type, msg.format, msg.seq) == ("s1", "chat", "text", 0)
    assert msg.payload == b"hello" and msg.meta == {}
    assert msg.t_capture_ns is not None  # client time + offset (f64 ms: within 1 us)
    assert abs(msg.t_capture_ns - (T0 + 250_000_000)) < 1000
    assert msg.clock_error_ns is not None and msg.clock_error_ns >= 0
    assert msg.t_router_recv_ns == T0 + 5_000_000
    assert ch.decode_record(ch.encode_record(msg)) == msg


def test_capture_time_unknown_without_a_clock_sample_or_nan() -> None:
    s = session()
    (a,) = s.stream(2, chat(0), False, T0, p.ClockOffset())
    assert isinstance(a, core.PublishChannel)
    assert a.message.t_capture_ns is None and a.message.clock_error_ns is None
    (b,) = s.stream(2, chat(1, t_ms=math.nan), False, T0, clock())
    assert isinstance(b, core.PublishChannel)
    assert b.message.t_capture_ns is None and b.message.clock_error_ns is None
    assert math.isnan(b.message.t_capture_ms)


def test_frames_split_anywhere_are_all_published_in_order() -> None:
    s = session()
    data = b"".join(chat(i, f"m{i}") for i in range(5))
    rng = random.Random(7)
    out: list[core.ChannelAction] = []
    at = 0
    while at < len(data):
        n = rng.randint(1, 9)
        out += s.stream(6, data[at : at + n], False, T0, clock())
        at += n
    seqs = [a.message.seq for a in out if isinstance(a, core.PublishChannel)]
    assert seqs == [0, 1, 2, 3, 4]


def test_unknown_type_is_refused_unread_and_labelled_unknown() -> None:
    s = session()
    frame = ch.encode_frame("telemetry", 3, T_MS, b"x" * 100)
    out = s.stream(2, frame + chat(0), False, T0, clock())
    assert kinds(out) == ["Refuse", "PublishChannel"]
    r = out[0]
    assert isinstance(r, core.Refuse)
    assert (r.label, r.seq, r.code) == ("unknown", 3, "unknown_type")
    assert "telemetry" in r.message
    assert s.counters[("unknown", "refused_unknown_type")] == 1
    assert "telemetry" not in s.types  # no state per invented name


def test_over_limit_is_refused_and_listed_in_the_end() -> None:
    s = session()
    big = chat(0, "x" * 2000)
    out = s.stream(2, big[:50], False, T0, clock())
    assert out == []  # skipping: nothing held but the head
    out = s.stream(2, big[50:] + chat(1), False, T0, clock())
    assert kinds(out) == ["Refuse", "PublishChannel"]
    r = out[0]
    assert isinstance(r, core.Refuse) and (r.label, r.seq, r.code) == ("chat", 0, "over_limit")
    assert "max 1024" in r.message
    s.settled("chat", 1, True, T0)
    (end,) = s.close("bye", T0 + 1)
    assert isinstance(end, core.PublishEnd)
    assert end.end == ch.ChannelEnd(
        session_id="s1", type="chat", accepted=1, last_seq=1, refused=1, refused_seqs=[0],
        reason="bye", t_end_ns=T0 + 1,
    )  # fmt: skip


def test_rate_follows_the_routes_bucket_and_a_reload_changes_it() -> None:
    s = session()
    frames = b"".join(chat(i) for i in range(8))
    out = s.stream(2, frames, False, T0, clock())
    codes = [a.code if isinstance(a, core.Refuse) else "ok" for a in out]
    assert codes == ["ok"] * 5 + ["rate"] * 3  # burst 5
    # 0.15 s later 1.5 more tokens (10/s)
    out = s.stream(2, chat(8) + chat(9), False, T0 + NS * 15 // 100, clock())
    assert kinds(out) == ["PublishChannel", "Refuse"]
    # Reloaded with a higher rate and burst: applies from the next message on.
    s.set_routes(routes(chat={"topic": "persistent://public/default/t-chat", "format": "text",
                              "max_rate": 1000, "burst": 100}))  # fmt: skip
    out = s.stream(2, b"".join(chat(i) for i in range(10, 30)), False, T0 + NS // 5, clock())
    assert kinds(out) == ["PublishChannel"] * 20


def test_bad_format_is_refused() -> None:
    s = session()
    bad_points = ch.encode_frame("points", 0, T_MS, b"\0" * 13, {"count": 1})
    bad_text = ch.encode_frame("chat", 0, T_MS, b"\xff\xfe")
    no_codec = ch.encode_frame("camera", 0, T_MS, b"\0\0\1", {"key": True, "timestamp_us": 0})
    out = s.stream(2, bad_points, False, T0, clock())
    out += s.stream(6, bad_text, False, T0, clock())
    out += s.stream(10, no_codec, False, T0, clock())
    assert [(a.label, a.code) for a in out if isinstance(a, core.Refuse)] == [
        ("points", "bad_format"), ("chat", "bad_format"), ("camera", "bad_format"),
    ]  # fmt: skip
    assert s.types["points"].refused_seqs == [0]


def test_points_pass_with_their_shape() -> None:
    s = session()
    payload = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    out = s.stream(2, ch.encode_frame("points", 0, T_MS, payload, {"count": 2}), False, T0, clock())
    (a,) = out
    assert isinstance(a, core.PublishChannel)
    assert ch.points_shape(a.message) == (2, 3)


def test_a_stream_that_is_not_frames_is_one_bad_message_and_then_ignored() -> None:
    s = session()
    out = s.stream(2, b"GET / HTTP/1.1\r\n", False, T0, clock())
    assert kinds(out) == ["BadStream"]
    bad = out[0]
    assert isinstance(bad, core.BadStream) and bad.code == "bad_frame"
    assert s.stream(2, chat(0), False, T0, clock()) == []  # the rest of it: ignored
    assert kinds(s.stream(6, chat(0), False, T0, clock())) == ["PublishChannel"]  # others go on


def test_bad_meta_is_a_bad_stream() -> None:
    s = session()
    frame = bytearray(ch.encode_frame("chat", 0, T_MS, b"hi", {"a": 1}))
    frame[frame.index(b"{")] = ord("[")
    assert kinds(s.stream(2, bytes(frame), False, T0, clock())) == ["BadStream"]


def test_datagrams_only_for_routes_that_allow_them() -> None:
    s = session()
    video = ch.encode_frame(
        "camera", 0, T_MS, b"\0\0\0\1e", {"codec": "h264", "key": True, "timestamp_us": 0}
    )
    (a,) = s.datagram(video, T0, clock())
    assert isinstance(a, core.PublishChannel) and a.message.type == "camera"
    (r,) = s.datagram(chat(0), T0, clock())
    assert isinstance(r, core.Refuse) and r.code == "bad_format" and "datagrams" in r.message
    (u,) = s.datagram(ch.encode_frame("nope", 0, T_MS), T0, clock())
    assert isinstance(u, core.Refuse) and (u.label, u.code) == ("unknown", "unknown_type")
    # Not one frame: rejected like a bad report datagram, not a bad message.
    (b,) = s.datagram(video[:-1], T0, clock())
    assert isinstance(b, core.BadDatagram) and b.code == "bad_frame"
    (t,) = s.datagram(video[:5], T0, clock())
    assert isinstance(t, core.BadDatagram) and "truncated" in t.message
    (v,) = s.datagram(b"\x01\x03\x00", T0, clock())
    assert isinstance(v, core.BadDatagram)


def test_end_waits_for_every_message_to_settle_and_lists_failures() -> None:
    s = session()
    out = s.stream(2, chat(0) + chat(1) + chat(2), False, T0, clock())
    assert kinds(out) == ["PublishChannel"] * 3
    assert s.close("closed: gone", T0) == []  # three still at the broker
    assert s.settled("chat", 0, True, T0) == []
    assert s.settled("chat", 2, False, T0) == []
    (end,) = s.settled("chat", 1, True, T0 + 7)
    assert isinstance(end, core.PublishEnd)
    assert end.end.accepted == 3 and end.end.last_seq == 2
    assert end.end.failed_seqs == [2] and end.end.refused_seqs == []
    assert end.end.reason == "closed: gone" and end.end.t_end_ns == T0 + 7
    assert s.done
    assert s.stream(2, chat(3), False, T0, clock()) == []  # closed: nothing more taken


def test_one_end_per_type_used_and_none_for_unused_or_unknown() -> None:
    s = session()
    s.stream(2, chat(0), False, T0, clock())
    s.stream(6, ch.encode_frame("points", 4, T_MS, b"", {"count": 0}), False, T0, clock())
    s.stream(10, ch.encode_frame("ghost", 0, T_MS), False, T0, clock())
    s.settled("chat", 0, True, T0)
    s.settled("points", 4, True, T0)
    ends = s.close("bye", T0)
    assert sorted((e.end.type, e.end.last_seq) for e in ends if isinstance(e, core.PublishEnd)) == [
        ("chat", 0), ("points", 4),
    ]  # fmt: skip


def test_overflow_becomes_a_refusal() -> None:
    s = session()
    assert kinds(s.stream(2, chat(0), False, T0, clock())) == ["PublishChannel"]
    (r,) = s.overflow("chat", 0, "chat #0: the queue is full", T0)
    assert isinstance(r, core.Refuse) and r.code == "overflow"
    (end,) = s.close("bye", T0)
    assert isinstance(end, core.PublishEnd)
    assert (end.end.accepted, end.end.refused_seqs, end.end.last_seq) == (0, [0], 0)


def test_a_type_moved_to_another_topic_ends_on_both() -> None:
    s = session()
    s.stream(2, chat(0), False, T0, clock())
    moved = {"topic": "persistent://public/default/t-chat2", "format": "text"}
    s.set_routes(routes(chat=moved))
    (a,) = s.stream(2, chat(1), False, T0, clock())
    assert isinstance(a, core.PublishChannel) and a.route.topic.endswith("t-chat2")
    s.settled("chat", 0, True, T0)
    s.settled("chat", 1, True, T0)
    ends = s.close("bye", T0)
    topics = sorted(e.route.topic for e in ends if isinstance(e, core.PublishEnd))
    assert topics == ["persistent://public/default/t-chat", "persistent://public/default/t-chat2"]


def test_refused_seqs_listed_up_to_the_bound_and_counted_beyond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ch, "MAX_LISTED_SEQS", 3)
    s = session()
    s.stream(2, b"".join(chat(i, "x" * 2000) for i in range(5)), False, T0, clock())
    (end,) = s.close("bye", T0)
    assert isinstance(end, core.PublishEnd)
    assert end.end.refused == 5 and end.end.refused_seqs == [0, 1, 2]


def test_too_many_streams_is_a_bad_message() -> None:
    s = session()
    for i in range(core.MAX_STREAMS):
        assert kinds(s.stream(4 * i + 2, chat(i)[:3], False, T0, clock())) == []
    out = s.stream(4 * core.MAX_STREAMS + 2, chat(0), False, T0, clock())
    assert kinds(out) == ["BadStream"]
    # Streams' ends free their places (the refused one's too: it is ignored to its end).
    s.stream(2, b"", True, T0, clock())
    s.stream(4 * core.MAX_STREAMS + 2, b"", True, T0, clock())
    assert kinds(s.stream(4 * 999 + 2, chat(0), False, T0, clock())) == ["PublishChannel"]


def test_capture_time_out_of_range_is_unknown() -> None:
    c = clock()
    assert core.capture_ns(2.0**62, c, T0) == (None, None)
    t, err = core.capture_ns(T_MS, c, T0)
    assert t is not None and abs(t - T0) < 1000 and err is not None


def test_the_session_tells_refusals_at_a_bounded_rate_and_counts_them_apart() -> None:
    from carom_router.session import Limits, SendControl, SessionCore

    s = SessionCore(Limits(), created_ns=T0)
    assert not s.takes_channels  # before hello
    s.control(p.frame(p.Hello(session_id="s1")), T0)
    assert s.takes_channels
    first = s.refuse_channel("rate", "chat over 20 messages/s", T0)
    assert s.refuse_channel("rate", "chat over 20 messages/s", T0 + 1000) == []  # within 1 s
    (sent,) = first
    assert isinstance(sent, SendControl)
    err = p.parse_router(sent.data[4:])
    assert isinstance(err, p.Error) and err.code == "rate" and not err.fatal
    later = s.refuse_channel("over_limit", "chat message of 5000 bytes", T0 + 2 * NS)
    (sent,) = later
    assert isinstance(sent, SendControl)
    err = p.parse_router(sent.data[4:])
    assert isinstance(err, p.Error) and "1 over_limit, 1 rate" in err.message  # the summary
    assert s.counters["channel_refused_rate"] == 2 and s.counters["invalid_rate"] == 0
    s.refuse_channel("bad_frame", "channel datagram: ...", T0 + 2 * NS, counter="invalid")
    assert s.counters["invalid_bad_frame"] == 1
    # A bad stream is a bad message: at max_bad_messages the session is closed.
    for i in range(Limits().max_bad_messages):
        s.bad("bad_frame", "not frames", T0 + 3 * NS + i)
    assert s.state == "closed" and not s.takes_channels
    assert s.refuse_channel("rate", "x", T0 + 9 * NS) == [] and s.bad("x", "y", T0) == []
