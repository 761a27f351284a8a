"""The session protocol's formats and pure helpers (no network)."""

from __future__ import annotations

import math
import random
import struct

import pytest

from carom import protocol as p
from carom import schemas
from carom.signaling import SessionParams


def test_control_frames_round_trip_across_any_split() -> None:
    msgs: list[p.ClientMessage] = [
        p.Hello(session_id="s1", params=SessionParams(fps=60)),
        p.Offer(sdp="v=0\r\n" + "a=x\r\n" * 2000),
        p.Pong(id=3, t_client_ms=1.7e12),
        p.Bye(),
    ]
    wire = b"".join(p.frame(m) for m in msgs)
    rng = random.Random(1)
    for _ in range(50):
        reader, got, i = p.FrameReader(), [], 0
        while i < len(wire):
            j = min(len(wire), i + rng.randint(1, 700))
            got += [p.parse_client(b) for b in reader.feed(wire[i:j])]
            i = j
        assert got == msgs and reader.pending == 0


def test_router_messages_parse() -> None:
    for m in (
        p.Welcome(session_id="s", max_report_rate=240.0),
        p.Ping(id=1, t_server_ns=5),
        p.Error(code="x", message="y", fatal=True),
    ):
        (body,) = p.FrameReader().feed(p.frame(m))
        assert p.parse_router(body) == m


def test_oversize_control_frame_is_refused_before_buffering() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.FrameReader().feed(struct.pack(">I", 10_000_000))
    assert info.value.code == "oversize"


@pytest.mark.parametrize(
    "body",
    [b"", b"null", b"[]", b"{}", b'{"type":"hello"}', b'{"type":"nope"}',
     b'{"type":"hello","session_id":"a b"}', b'{"type":"pong","id":-1,"t_client_ms":1}',
     b'{"type":"pong","id":1,"t_client_ms":NaN}', b"\xff\xfe",
     b'{"type":"offer","sdp":"\xff\xfe0123456789"}'],  # invalid UTF-8 inside a string
)  # fmt: skip
def test_bad_control_messages(body: bytes) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client(body)
    assert info.value.code == "bad_message"


def test_invalid_utf8_from_the_router_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_router(b'{"type":"error","code":"x","message":"\xff\xfe"}')
    assert info.value.code == "bad_message"


def test_report_round_trip() -> None:
    data = p.encode_report(7, 2**32 - 1, (320.25, 11.5), 1.7e12, 1.7e12 + 0.4)
    assert len(data) == p.REPORT.size == 36
    r = p.decode_report(data)
    assert (r.seq, r.rtp_ts, r.detected, r.x, r.y) == (7, 2**32 - 1, True, 320.25, 11.5)
    assert r.t_recv_ms == 1.7e12 and r.t_analysed_ms == pytest.approx(1.7e12 + 0.4)
    miss = p.decode_report(p.encode_report(8, 5, None, None, 1.7e12))
    assert (miss.detected, miss.x, miss.y, miss.t_recv_ms) == (False, None, None, None)


def _raw(**kw: object) -> bytes:
    f: dict[str, object] = dict(
        v=1, kind=1, flags=1, seq=1, rtp=1, x=1.0, y=1.0, tr=1.7e12, ta=1.7e12
    )
    f.update(kw)
    return p.REPORT.pack(*f.values())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "truncated"),
        (b"\x01", "truncated"),
        (_raw()[:-1], "truncated"),
        (_raw() + b"\x00", "length"),
        (b"\x01" * 2000, "oversize"),
        (_raw(v=2), "version"),
        (_raw(kind=2), "kind"),
        (_raw(flags=6), "flags"),
        (_raw(x=math.nan), "nan"),
        (_raw(y=math.inf), "nan"),
        (_raw(x=-1.0), "range"),
        (_raw(x=1e30), "range"),
        (_raw(flags=0, x=5.0), "range"),
        (_raw(tr=-5.0), "time"),
        (_raw(ta=math.inf), "time"),
        (_raw(ta=1e300), "time"),
    ],
)
def test_bad_reports_name_the_reason(data: bytes, code: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_report(data)
    assert info.value.code == code


def test_random_bytes_never_crash_the_decoder() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        data = rng.randbytes(rng.choice([0, 1, 2, 35, 36, 37, rng.randint(0, 1200)]))
        try:
            r = p.decode_report(data)
        except p.ProtocolError:
            continue
        assert r.x is None or 0 <= r.x <= schemas.MAX_FRAME_SIDE


def test_error_datagram_round_trip() -> None:
    res = schemas.build(
        schemas.FrameResult, session_id="s", frame=9, rtp_ts=77, status="ok", truth_x=1.0,
        truth_y=2.0, x=1.5, y=2.0, l2=0.5, t_render_ns=1_000_000_000,
        t_router_recv_ns=1_016_000_000, t_computed_ns=1_020_000_000,
    )  # fmt: skip
    e = p.decode_result(p.encode_result(res))
    assert (e.rtp_ts, e.frame, e.status, e.l2) == (77, 9, "ok", 0.5)
    assert e.render_to_router_ms == pytest.approx(16.0)
    assert e.render_to_computed_ms == pytest.approx(20.0)
    missed = schemas.build(
        schemas.FrameResult, session_id="s", frame=9, rtp_ts=77, status="missed", truth_x=1.0,
        truth_y=2.0, t_render_ns=1, t_computed_ns=2,
    )  # fmt: skip
    e = p.decode_result(p.encode_result(missed))
    assert (e.status, e.x, e.l2, e.render_to_router_ms) == ("missed", None, None, None)


def test_clock_offset_takes_the_minimum_delay_sample() -> None:
    c = p.ClockOffset()
    assert not c.known and c.to_server_ns(None) is None
    true_offset = 5_000_000_000  # server 5 s ahead of the client
    for t0, up, down in [
        (0, 3_000_000, 9_000_000),
        (10**9, 200_000, 200_000),
        (2 * 10**9, 1, 10**7),
    ]:
        t_client_ms = (t0 + up - true_offset) / 1e6
        c.add(t0, t_client_ms, t0 + up + down)
    assert c.known and c.rtt_ns == 400_000
    assert abs(c.offset_ns - true_offset) <= 1  # symmetric path: exact
    assert c.to_server_ns(1000.0) == 1_000_000_000 + c.offset_ns


def _pong(c: p.ClockOffset, t0: int, up: int, down: int, true_offset: int) -> None:
    """One exchange: ping sent at server time t0, ``up`` ns out, ``down`` ns back."""
    c.add(t0, (t0 + up - true_offset) / 1e6, t0 + up + down)


def test_clock_error_is_half_the_round_trip_plus_drift_since() -> None:
    c = p.ClockOffset(max_drift_ppm=10.0)
    assert c.error_ns(0) is None and c.best is None
    off = -7_000_000
    _pong(c, 10**9, 100_000, 500_000, off)  # asymmetric: 0.6 ms round trip, 0.2 ms off
    assert c.offset_ns - off == 200_000 and c.rtt_ns == 600_000
    assert c.error_ns(10**9 + 300_000) == 300_000  # at the sample: rtt / 2
    assert c.error_ns(11 * 10**9 + 300_000) == 300_000 + 100_000  # 10 s later: + 10 ppm * 10 s
    assert abs(c.offset_ns - off) <= c.error_ns(10**9)  # type: ignore[operator]
    odd = p.ClockOffset()
    odd.add(0, 0.0, 3)
    assert odd.error_ns(0) == 2  # rounded up: a bound, never below the truth


def test_a_fresh_sample_replaces_a_better_one_once_its_age_costs_more() -> None:
    c = p.ClockOffset(max_drift_ppm=10.0, window_s=1000)
    _pong(c, 0, 100_000, 100_000, 0)  # rtt 0.2 ms at t=0
    best = c.best
    _pong(c, 5 * 10**9, 200_000, 200_000, 0)  # rtt 0.4 ms, 5 s later: +0.1 ms, not worth it
    assert c.best is best
    _pong(c, 30 * 10**9, 200_000, 200_000, 0)  # 30 s later: the old one's bound is 0.4 ms
    assert c.best is not None and c.best.t_ns == 30 * 10**9 + 200_000
    assert c.error_ns(c.best.t_ns) == 200_000


def test_clock_samples_leave_the_time_window() -> None:
    c = p.ClockOffset(max_drift_ppm=0.0, window_s=10)
    _pong(c, 0, 50_000, 50_000, 0)  # the best round trip, but it expires
    for i in range(1, 30):
        _pong(c, i * 10**9, 1_000_000, 1_000_000, 0)
    assert c.rtt_ns == 2_000_000 and c.samples == 30
    late = p.ClockOffset(max_drift_ppm=0.0, window_s=10)
    _pong(late, 20 * 10**9, 1_000_000, 1_000_000, 0)
    _pong(late, 0, 50_000, 50_000, 0)  # one taken long ago, arriving last, is already out
    assert late.rtt_ns == 2_000_000 and late.samples == 2


def test_negative_round_trips_are_ignored() -> None:
    c = p.ClockOffset()
    c.add(10, 0.0, 5)
    assert not c.known and c.samples == 0


def test_token_bucket() -> None:
    b = p.TokenBucket(rate=10, burst=5)
    assert sum(b.allow(0.0) for _ in range(20)) == 5
    assert sum(b.allow(1.0) for _ in range(20)) == 5  # refilled to the burst, not beyond
    assert b.allow(1.1) and not b.allow(1.1)


def test_status_and_end_with_reason_round_trip() -> None:
    for m in (
        p.Status(state="degraded", part="broker", detail="the Pulsar broker is unreachable"),
        p.Status(state="recovered", part="tracker"),
        p.End(complete=True, frames_due=30, reason="connect timeout"),
        p.End(complete=False),
    ):
        (body,) = p.FrameReader().feed(p.frame(m))
        assert p.parse_router(body) == m
    # An older router's end (no reason) still parses: the reason is empty.
    assert p.parse_router(b'{"type":"end","complete":true,"frames_due":3}') == p.End(
        complete=True, frames_due=3
    )
    with pytest.raises(p.ProtocolError):
        p.parse_router(b'{"type":"status","state":"degraded","part":"router"}')


def test_frame_reader_takes_frames_one_at_a_time_under_a_changing_limit() -> None:
    reader = p.FrameReader(p.MAX_HELLO_BYTES)
    hello = p.frame(p.Hello(session_id="s1"))
    offer = p.frame(p.Offer(sdp="v=0\r\n" + "a=x\r\n" * 2000))  # over the hello limit
    reader.push(hello + offer)
    assert reader.next() is not None
    with pytest.raises(p.ProtocolError):
        reader.next()  # the offer, still under the hello's limit
    reader.max_bytes = p.MAX_CONTROL_BYTES
    body = reader.next()
    assert body is not None and isinstance(p.parse_client(body), p.Offer)
    assert reader.next() is None and reader.pending == 0
    reader.push(b"\x00\x00")
    reader.clear()
    assert reader.pending == 0
