"""The router's per-session state machine, driven in memory."""

from __future__ import annotations

import math
from collections.abc import Sequence

from carom import protocol as p
from carom.signaling import SessionParams
from carom_router.session import (
    Close,
    Limits,
    Publish,
    RelayOffer,
    SendControl,
    SessionCore,
    StopStream,
)

T0 = 1_795_000_000 * 10**9
MS = 1_000_000


def sent(actions: Sequence[object]) -> list[p.RouterMessage]:
    out = []
    for a in actions:
        if isinstance(a, SendControl):
            (body,) = p.FrameReader().feed(a.data)
            out.append(p.parse_router(body))
    return out


def ready(limits: Limits | None = None) -> SessionCore:
    s = SessionCore(limits or Limits(), created_ns=T0)
    acts = s.control(p.frame(p.Hello(session_id="s1", params=SessionParams(fps=60))), T0)
    msgs = sent(acts)
    assert isinstance(msgs[0], p.Welcome) and isinstance(msgs[1], p.Ping)
    return s


def test_hello_offer_answer() -> None:
    s = ready()
    (relay,) = s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0 + MS)
    assert relay == RelayOffer("s1", "v=0 offer sdp", SessionParams(fps=60))
    assert s.state == "negotiating"
    assert isinstance(sent(s.control(p.frame(p.Offer(sdp="v=0 again...")), T0))[0], p.Error)
    (answer,) = sent(s.relay_done("v=0 answer", "H264", SessionParams(fps=60.0)))
    assert isinstance(answer, p.Answer) and answer.codec == "H264" and s.state == "active"


def test_relay_failure_lets_the_client_retry() -> None:
    s = ready()
    s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0)
    (err,) = sent(s.relay_failed("simulator_unavailable", "simulator down"))
    assert isinstance(err, p.Error) and not err.fatal and s.state == "ready"
    assert isinstance(s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0)[0], RelayOffer)


def test_first_message_must_be_hello() -> None:
    s = SessionCore(Limits(), created_ns=T0)
    acts = s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0)
    assert isinstance(sent(acts)[0], p.Error) and sent(acts)[0].fatal  # type: ignore[union-attr]
    assert isinstance(acts[-1], Close) and s.state == "closed"
    assert s.control(p.frame(p.Bye()), T0) == [] and s.datagram(b"x", T0) == []


def test_hello_timeout() -> None:
    s = SessionCore(Limits(hello_timeout_s=1), created_ns=T0)
    assert s.tick(T0 + MS) == []
    assert isinstance(s.tick(T0 + 2000 * MS)[-1], Close)


def test_reports_are_converted_to_the_server_clock() -> None:
    # The client clock runs 2 s behind the server; 1 ms each way. Browser times are float epoch
    # ms, exact to ~0.25 us at today's epoch, hence the 1 us tolerances.
    s = SessionCore(Limits(), created_ns=T0)
    pings = [m for m in sent(s.control(p.frame(p.Hello(session_id="s2")), T0))
             if isinstance(m, p.Ping)]  # fmt: skip
    t_client_ms = (pings[0].t_server_ns + MS - 2000 * MS) / 1e6
    (clock,) = sent(
        s.control(p.frame(p.Pong(id=pings[0].id, t_client_ms=t_client_ms)), T0 + 2 * MS)
    )
    assert isinstance(clock, p.ClockEstimate) and clock.rtt_ms == 2.0
    assert abs(clock.offset_ms - 2000.0) < 1e-3
    now = T0 + 50 * MS
    t_recv_client_ms = (T0 + 40 * MS - 2000 * MS) / 1e6
    (pub,) = s.datagram(p.encode_report(1, 99, (10.0, 20.0), t_recv_client_ms, None), now)
    assert isinstance(pub, Publish)
    m = pub.message
    assert (m.session_id, m.rtp_ts, m.x, m.y, m.detected) == ("s2", 99, 10.0, 20.0, True)
    assert m.t_browser_recv_ns is not None and abs(m.t_browser_recv_ns - (T0 + 40 * MS)) < 1000
    assert m.t_browser_analysed_ns is None
    assert m.t_router_recv_ns == now and abs(m.clock_offset_ns - 2000 * MS) < 1000


def test_each_centroid_carries_the_bound_of_its_clock_offset() -> None:
    s = SessionCore(Limits(), created_ns=T0)
    (ping,) = [m for m in sent(s.control(p.frame(p.Hello(session_id="s3")), T0))
               if isinstance(m, p.Ping)]  # fmt: skip
    report = p.encode_report(1, 5, (1.0, 1.0), T0 / 1e6, T0 / 1e6)
    (before,) = s.datagram(report, T0 + MS)
    assert isinstance(before, Publish) and before.message.clock_error_ns is None  # no pong yet
    # Same clocks; the pong is read 1 ms after the ping left and is back 2 ms later.
    s.control(p.frame(p.Pong(id=ping.id, t_client_ms=(T0 + MS) / 1e6)), T0 + 3 * MS)
    now = T0 + 3 * MS + 10**9  # a report 1 s later
    (pub,) = s.datagram(report, now)
    assert isinstance(pub, Publish)
    drift_ns = math.ceil((now - (T0 + 3 * MS // 2)) * p.MAX_DRIFT_PPM / 1e6)
    assert pub.message.clock_error_ns == 3 * MS // 2 + drift_ns  # half the round trip + drift
    assert abs(pub.message.clock_offset_ns - MS // 2) < 1000  # 0.5 ms off, within that bound


def test_bad_datagrams_are_counted_and_reported_at_a_bounded_rate() -> None:
    s = ready()
    errors = 0
    for i in range(1000):
        acts = s.datagram(b"\x09garbage", T0 + i * MS)  # 1 s of garbage at 1 kHz
        errors += len(sent(acts))
    assert s.counters["invalid_version"] == 1000
    assert errors == 1  # one error message per second, summarising the counts
    (err,) = sent(s.datagram(b"", T0 + 1500 * MS))
    assert (
        isinstance(err, p.Error) and "999 version" in err.message and "1 truncated" in err.message
    )


def test_report_before_hello_is_rejected() -> None:
    s = SessionCore(Limits(), created_ns=T0)
    s.datagram(p.encode_report(1, 1, (1.0, 1.0), None, None), T0)
    assert s.counters["invalid_before_hello"] == 1


def test_report_rate_limit() -> None:
    s = ready(Limits(max_report_rate=100, report_burst=10))
    data = p.encode_report(1, 1, None, None, None)
    published = sum(isinstance(a, Publish) for i in range(100) for a in s.datagram(data, T0))
    assert published == 10 and s.counters["invalid_rate"] == 90


def test_times_that_convert_below_zero_are_rejected_not_published() -> None:
    s = ready()
    s.clock.add(T0, (T0 + 10**15) / 1e6, T0)  # absurd: client 11 days ahead
    acts = s.datagram(p.encode_report(1, 1, (1.0, 1.0), 1.0, None), T0)
    assert not any(isinstance(a, Publish) for a in acts)
    assert s.counters["invalid_schema"] == 1


def test_oversize_control_frame_closes_the_session() -> None:
    s = ready()
    acts = s.control(b"\x7f\xff\xff\xff", T0)
    assert isinstance(acts[-1], Close) and s.counters["fatal_oversize"] == 1


def test_bad_control_message_is_an_error_not_a_close() -> None:
    s = ready()
    acts = s.control(b"\x00\x00\x00\x02{}", T0)
    assert isinstance(sent(acts)[0], p.Error) and s.state == "ready"


def test_bye_and_stream_end_close_once() -> None:
    s = ready()
    assert isinstance(s.control(p.frame(p.Bye()), T0)[-1], Close)
    assert s.control_closed() == []


def active(limits: Limits | None = None) -> SessionCore:
    s = ready(limits)
    s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0)
    s.relay_done("v=0 answer", "H264", SessionParams(fps=60))
    assert s.state == "active"
    return s


def report_bytes(rtp: int) -> bytes:
    return p.encode_report(1, rtp, (10.0, 20.0), T0 / 1e6, T0 / 1e6)


def test_bye_while_streaming_drains_until_every_result_is_sent() -> None:
    s = active()
    assert s.control(p.frame(p.Bye()), T0 + MS) == [StopStream("s1")]
    assert s.state == "draining"
    assert s.control(p.frame(p.Bye()), T0 + 2 * MS) == []  # said twice: nothing more
    # Reports still in flight for frames rendered before the stream stopped are taken.
    (pub,) = s.datagram(report_bytes(9000), T0 + 3 * MS)
    assert isinstance(pub, Publish) and pub.message.rtp_ts == 9000
    assert isinstance(sent(s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0))[0], p.Error)
    acts = s.results_done(123, T0 + 4 * MS)
    assert sent(acts) == [p.End(complete=True, frames_due=123)] and len(acts) == 1
    assert s.state == "ending"  # the client closes: closing here could lose the end message
    assert s.results_done(123, T0 + 5 * MS) == [] and s.counters["ended_complete"] == 1
    assert s.control(p.frame(p.Bye()), T0 + 6 * MS) == []
    assert isinstance(s.control_closed()[-1], Close) and s.state == "closed"


def test_a_client_that_does_not_close_after_end_is_closed() -> None:
    s = active(Limits(end_linger_s=2))
    s.control(p.frame(p.Bye()), T0)
    s.results_done(5, T0 + MS)
    assert not any(isinstance(a, Close) for a in s.tick(T0 + 2000 * MS))
    assert isinstance(s.tick(T0 + 2001 * MS)[-1], Close) and s.state == "closed"


def test_a_drain_with_no_word_from_the_tracker_ends_incomplete() -> None:
    s = active(Limits(drain_timeout_s=2))
    s.control(p.frame(p.Bye()), T0)
    assert not any(isinstance(a, Close) for a in s.tick(T0 + 1999 * MS))
    acts = s.tick(T0 + 2000 * MS)
    assert sent(acts) == [p.End(complete=False)] and s.state == "ending"
    assert s.counters["ended_incomplete"] == 1
    assert isinstance(s.tick(T0 + 4001 * MS)[-1], Close)


def test_a_stream_ended_by_the_simulator_is_reported_the_same_way() -> None:
    s = active()
    assert sent(s.results_done(7, T0)) == [p.End(complete=True, frames_due=7)]
    s2 = ready()  # no video yet: a stray SessionResults changes nothing
    assert s2.results_done(7, T0) == [] and s2.state == "ready"


def test_pings_start_fast_then_slow_down() -> None:
    s = ready(Limits(ping_interval_s=5, initial_pings=2))
    times = [T0 + i * 10 * MS for i in range(1, 200)]
    pings = [t for t in times for m in sent(s.tick(t)) if isinstance(m, p.Ping)]
    assert len(pings) >= 5  # unanswered: keeps trying at the fast rate
    s2 = ready(Limits(ping_interval_s=5, initial_pings=1))
    s2.clock.add(T0, T0 / 1e6, T0 + MS)
    pings = [t for t in times for m in sent(s2.tick(t)) if isinstance(m, p.Ping)]
    assert len(pings) == 1


def test_stats_are_kept() -> None:
    s = ready()
    s.control(p.frame(p.BrowserStats(fps=59.9, codec="H264")), T0)
    assert s.stats is not None and math.isclose(s.stats.fps or 0, 59.9)
