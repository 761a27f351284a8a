"""The router's per-session state machine, driven in memory."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from carom import protocol as p
from carom import schemas
from carom.signaling import SessionControl, SessionParams, SessionState
from carom_router.session import (
    STOPPED_BY_SIMULATOR,
    Close,
    Limits,
    Pacing,
    Publish,
    PublishStats,
    RelayControl,
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


def ready(limits: Limits | None = None, pacing: Pacing | None = None) -> SessionCore:
    s = SessionCore(limits or Limits(), created_ns=T0, pacing=pacing or Pacing())
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


def test_a_first_message_that_does_not_parse_is_fatal_too() -> None:
    s = SessionCore(Limits(), created_ns=T0)
    acts = s.control(b"\x00\x00\x00\x01x" * 1000, T0)
    (err,) = sent(acts)
    assert isinstance(err, p.Error) and err.fatal and err.code == "expected_hello"
    assert isinstance(acts[-1], Close) and s.state == "closed"


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


def active(limits: Limits | None = None, pacing: Pacing | None = None) -> SessionCore:
    s = ready(limits, pacing)
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
    # Marked final: the shell sends it only after every result it still holds.
    assert isinstance(acts[0], SendControl) and acts[0].final
    assert s.state == "ending"  # the client closes: closing here could lose the end message
    assert s.results_done(123, T0 + 5 * MS) == [] and s.counters["ended_complete"] == 1
    assert s.control(p.frame(p.Bye()), T0 + 6 * MS) == []
    assert isinstance(s.control_closed()[-1], Close) and s.state == "closed"


def test_a_client_that_does_not_close_after_end_is_closed() -> None:
    s = active(pacing=Pacing(end_linger_s=2))
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


def test_a_stream_ended_by_the_simulator_is_reported_the_same_way_with_its_reason() -> None:
    s = active()
    (end,) = sent(s.results_done(7, T0, "connect timeout"))
    assert end == p.End(complete=True, frames_due=7, reason="connect timeout")
    assert s.state == "ending" and s.counters["ended_by_simulator"] == 1
    s2 = active()  # a simulator too old to give a reason: the client is still told why
    assert sent(s2.results_done(7, T0)) == [
        p.End(complete=True, frames_due=7, reason=STOPPED_BY_SIMULATOR)
    ]
    s3 = ready()  # no video yet: a stray SessionResults changes nothing
    assert s3.results_done(7, T0) == [] and s3.state == "ready"


def test_after_a_bye_end_carries_no_reason() -> None:
    s = active()
    s.control(p.frame(p.Bye()), T0)
    (end,) = sent(s.results_done(7, T0, "deleted"))  # the router's own DELETE: not news
    assert end == p.End(complete=True, frames_due=7)


# --- hostile clients --------------------------------------------------------------------------


def test_a_flood_of_bad_frames_is_answered_a_few_times_then_closed() -> None:
    s = ready(Limits(max_bad_messages=10, max_error_rate=2), Pacing(error_burst=5))
    flood = b"\x00\x00\x00\x01x" * 50_000  # 250 kB of 5-byte frames, one chunk
    acts = s.control(flood, T0 + MS)
    msgs = sent(acts)
    errors = [m for m in msgs if isinstance(m, p.Error)]
    assert len(errors) == 6 and all(e.code == "bad_message" for e in errors[:5])
    fatal = errors[-1]
    assert fatal.fatal and fatal.code == "too_many_errors" and "10 bad" in fatal.message
    close = acts[-1]
    assert isinstance(close, Close) and close.code == p.CLOSE_TOO_MANY_ERRORS
    assert s.counters["errors_suppressed"] == 4 and s.counters["control_invalid"] == 10
    assert s.state == "closed" and s._reader.pending == 0  # the rest was never parsed, and let go
    assert s.control(flood, T0 + 2 * MS) == []


def test_error_replies_are_rate_limited_not_the_count() -> None:
    s = ready(Limits(max_bad_messages=1000, max_error_rate=2), Pacing(error_burst=5))
    replies = 0
    for i in range(100):  # one bad message every 10 ms for a second
        replies += len(sent(s.control(b"\x00\x00\x00\x02{}", T0 + i * 10 * MS)))
    assert 5 < replies <= 5 + 2  # the burst, then 2 a second (the second's end not included)
    assert s.counters["errors_suppressed"] == 100 - replies and s.state == "ready"


def test_control_messages_beyond_the_rate_are_dropped_and_count_as_bad() -> None:
    s = ready(Limits(max_control_rate=10, max_bad_messages=5))
    stats = p.frame(p.BrowserStats(fps=30.0))
    acts = s.control(stats * 13, T0 + MS)  # with the hello, 10 taken; 4 over the rate: bad
    assert s.counters["control_browserstats"] == 9 and s.counters["error_control_rate"] == 4
    assert s.state == "ready" and not any(isinstance(a, Close) for a in acts)
    acts = s.control(stats, T0 + 2 * MS)  # the fifth bad message
    assert isinstance(acts[-1], Close) and acts[-1].code == p.CLOSE_TOO_MANY_ERRORS
    s2 = ready(Limits(max_control_rate=10))
    for i in range(100):  # 5 a second for 20 s: never over
        s2.control(stats, T0 + i * 200 * MS)
    assert s2.counters["control_browserstats"] == 100 and s2.state == "ready"


def test_the_first_frame_must_be_a_small_hello() -> None:
    s = SessionCore(Limits(), created_ns=T0)
    acts = s.control(struct_len(p.MAX_HELLO_BYTES + 1), T0)
    (err,) = sent(acts)
    assert isinstance(err, p.Error) and err.fatal and err.code == "hello_too_large"
    assert isinstance(acts[-1], Close) and acts[-1].code == p.CLOSE_PROTOCOL_ERROR
    s2 = ready()  # after hello, frames up to MAX_CONTROL_BYTES are taken
    s2.control(struct_len(p.MAX_HELLO_BYTES + 1), T0)
    assert s2.state == "ready" and s2._reader.pending == 4


def struct_len(n: int) -> bytes:
    return n.to_bytes(4, "big")


def test_datagrams_before_hello_are_bad_messages() -> None:
    s = SessionCore(Limits(max_bad_messages=3), created_ns=T0)
    report = p.encode_report(1, 1, (1.0, 1.0), None, None)
    assert not any(isinstance(a, Close) for a in s.datagram(report, T0) + s.datagram(report, T0))
    acts = s.datagram(report, T0)
    assert isinstance(acts[-1], Close) and s.counters["invalid_before_hello"] == 3


def test_offers_the_simulator_refuses_count_as_bad_its_outages_do_not() -> None:
    s = ready(Limits(max_bad_messages=3))
    for _ in range(5):  # the simulator is away: the client may keep trying
        s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0)
        assert not any(isinstance(a, Close) for a in s.relay_failed("simulator_503", "full"))
    closes = []
    for _ in range(3):  # its own offer is refused each time
        s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0)
        acts = s.relay_failed("simulator_400", "no H264")
        closes += [a for a in acts if isinstance(a, Close)]
    assert len(closes) == 1 and s.state == "closed"


def test_a_late_pong_is_counted_not_held_against_the_client() -> None:
    s = ready(Limits(max_bad_messages=2))
    for i in range(5):
        assert s.control(p.frame(p.Pong(id=1000 + i, t_client_ms=1.7e12)), T0) == []
    assert s.counters["pong_unknown"] == 5 and s.state == "ready"


def test_status_reaches_a_session_only_after_hello() -> None:
    status = p.Status(state="degraded", part="broker", detail="lost")
    s = SessionCore(Limits(), created_ns=T0)
    assert s.notify(status) == []
    s.control(p.frame(p.Hello(session_id="s9")), T0)
    assert sent(s.notify(status)) == [status]
    s.control_closed()
    assert s.notify(status) == []


def test_pings_start_fast_then_slow_down() -> None:
    s = ready(Limits(ping_interval_s=5), Pacing(initial_pings=2))
    times = [T0 + i * 10 * MS for i in range(1, 200)]
    pings = [t for t in times for m in sent(s.tick(t)) if isinstance(m, p.Ping)]
    assert len(pings) >= 5  # unanswered: keeps trying at the fast rate
    s2 = ready(Limits(ping_interval_s=5), Pacing(initial_pings=1))
    s2.clock.add(T0, T0 / 1e6, T0 + MS)
    pings = [t for t in times for m in sent(s2.tick(t)) if isinstance(m, p.Ping)]
    assert len(pings) == 1


def test_stats_are_kept() -> None:
    s = ready()
    s.control(p.frame(p.BrowserStats(fps=59.9, codec="H264")), T0)
    assert s.stats is not None and math.isclose(s.stats.fps or 0, 59.9)


def test_stats_are_published_on_the_centroid_topic_with_the_routers_time() -> None:
    s = active()
    stats = p.BrowserStats(
        fps=29.97, jitter_buffer_ms=12.5, decode_ms=1.5, frames_received=901, frames_decoded=900,
        frames_dropped=1, freeze_count=2, freezes_ms=350.0, bytes_received=1_234_567,
        width=1280, height=720, codec="H264",
    )  # fmt: skip
    (pub,) = s.control(p.frame(stats), T0 + 5 * MS)
    assert isinstance(pub, PublishStats)
    assert pub.message == schemas.ClientStats(
        session_id="s1", t_router_recv_ns=T0 + 5 * MS, fps=29.97, jitter_buffer_ms=12.5,
        decode_ms=1.5, frames_received=901, frames_decoded=900, frames_dropped=1, freeze_count=2,
        freezes_ms=350.0, bytes_received=1_234_567, width=1280, height=720, codec="H264",
    )  # fmt: skip
    assert s.stats == stats and s.counters["client_stats"] == 1
    # Published as the topic's consumers read it.
    encoded = schemas.encode(pub.message)
    assert schemas.decode_centroid_topic(encoded) == pub.message
    (empty,) = s.control(p.frame(p.BrowserStats()), T0)  # every field optional
    assert isinstance(empty, PublishStats) and empty.message.fps is None


# --- live control -------------------------------------------------------------------------------


def control(cid: int, **fields: object) -> bytes:
    return p.frame(p.Control(id=cid, set=SessionControl(**fields)))  # type: ignore[arg-type]


def acks(actions: Sequence[object]) -> list[p.ControlAck]:
    return [m for m in sent(actions) if isinstance(m, p.ControlAck)]


IN_FORCE = SessionParams(fps=60, width=640, height=480, gravity=0.0)


def state(phase: int, st: str = "streaming", **params: object) -> SessionState:
    return SessionState(
        session_id="s1", state=st, phase=phase,  # type: ignore[arg-type]
        params=msgspec.structs.replace(IN_FORCE, **params),
    )  # fmt: skip


def test_a_control_is_relayed_and_acked_with_what_is_in_force() -> None:
    s = active()
    (relay,) = s.control(control(1, fps=30, state="streaming"), T0)
    assert relay == RelayControl("s1", 1, SessionControl(fps=30, state="streaming"))
    assert s.control_in_flight == 1
    (ack,) = acks(s.control_done(1, state(1, fps=30.0)))
    assert ack == p.ControlAck(
        id=1, ok=True, state="streaming", phase=1, params=state(1, fps=30.0).params
    )
    assert (s.phase, s.stream_state, s.params.fps) == (1, "streaming", 30)
    assert not s.control_in_flight
    (stop,) = s.control(control(2, state="stopped"), T0 + MS)  # the next one goes through
    assert isinstance(stop, RelayControl) and stop.set == SessionControl(state="stopped")
    (ack,) = acks(s.control_done(2, state(2, "stopped", fps=30.0)))
    assert ack.ok and ack.state == "stopped" and ack.phase == 2 and s.stream_state == "stopped"
    assert s.counters["live_control_ok"] == 2


def test_one_control_in_flight_a_second_is_refused_busy() -> None:
    s = active()
    s.control(control(1, fps=30), T0)
    (busy,) = acks(s.control(control(2, vx=10.0), T0 + MS))
    assert busy.id == 2 and not busy.ok and busy.error.startswith("busy")
    assert "control 1" in busy.error and busy.params is None and busy.phase is None
    assert s.control_in_flight == 1 and s.counters["live_control_busy"] == 1
    assert s.control_done(2, state(1)) == []  # not the one in flight: nothing
    (ack,) = acks(s.control_done(1, state(1, fps=30.0)))
    assert ack.id == 1 and ack.ok
    assert s.control_done(1, state(1)) == []  # answered once
    # Busy is answered, not held against the client: a racing UI is no attacker.
    for i in range(20):  # one a second: within the live control rate
        s.control(control(3, fps=25), T0 + (i + 1) * 1000 * MS)
        s.control(control(100 + i, fps=20), T0 + (i + 1) * 1000 * MS)
        s.control_done(3, state(2 + i))
    assert s.state == "active" and s.counters["live_control_busy"] == 21


def test_a_control_before_the_answer_is_refused_no_stream_yet() -> None:
    s = ready()
    (ack,) = acks(s.control(control(7, state="stopped"), T0))
    assert ack == p.ControlAck(id=7, ok=False, error=ack.error)
    assert ack.error.startswith("no stream yet") and s.control_in_flight is None
    s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0)  # negotiating: still no stream
    (ack,) = acks(s.control(control(8, fps=10), T0))
    assert ack.error.startswith("no stream yet")
    assert s.counters["live_control_no_stream_yet"] == 2 and s.state == "negotiating"


def test_a_control_after_bye_is_refused_ending() -> None:
    s = active()
    s.control(p.frame(p.Bye()), T0)
    acts = s.control(control(1, fps=10), T0 + MS)
    (ack,) = acks(acts)
    assert not ack.ok and ack.error.startswith("ending")
    assert not any(isinstance(a, RelayControl) for a in acts)


def test_the_simulators_refusal_or_absence_reaches_the_client_and_nothing_changes() -> None:
    s = active()
    s.control(control(1, background="nosuch"), T0)
    (ack,) = acks(s.control_failed(1, "refused", "background: no video file named nosuch"))
    assert ack == p.ControlAck(id=1, ok=False, error="background: no video file named nosuch")
    assert s.phase == 0 and s.params == SessionParams(fps=60)
    s.control(control(2, fps=30), T0 + MS)
    (ack,) = acks(s.control_failed(2, "unavailable", "simulator unavailable: no answer"))
    assert not ack.ok and ack.error == "simulator unavailable: no answer"
    assert s.counters["live_control_refused"] == 1 and s.counters["live_control_unavailable"] == 1
    assert s.control_in_flight is None and s.state == "active"
    s.control(control(3, fps=30), T0 + 2 * MS)
    (ack,) = acks(s.control_failed(3, "unavailable", "x" * 2000))
    assert len(ack.error) == 500  # the ack's bound: the client decodes it
    p.parse_router(p.FrameReader().feed(p.frame(ack))[0])


def test_an_invalid_value_is_refused_naming_the_field_and_never_relayed() -> None:
    s = active(Limits(max_bad_messages=3))
    bad = {
        "fps": b'{"type":"control","id":4,"set":{"fps":500}}',
        "width": b'{"type":"control","id":5,"set":{"width":641}}',
        "cor": b'{"type":"control","id":6,"set":{"cor":0}}',
        "state": b'{"type":"control","id":7,"set":{"state":"paused"}}',
        "bitrate": b'{"type":"control","id":8,"set":{"bitrate":1000}}',
        "background": b'{"type":"control","id":9,"set":{"background":"../etc"}}',
    }
    for i, (name, body) in enumerate(bad.items()):
        acts = s.control(len(body).to_bytes(4, "big") + body, T0 + i * MS)
        (ack,) = acks(acts)
        assert ack.id == 4 + i and not ack.ok and ack.error.startswith(f"{name}: "), ack
        assert not any(isinstance(a, RelayControl) for a in acts)
    assert "<= 240" in acks(s.control(control(10, fps=500), T0))[0].error
    unknown = b'{"type":"control","id":11,"set":{"radius":5}}'
    (ack,) = acks(s.control(len(unknown).to_bytes(4, "big") + unknown, T0))
    assert "unknown field `radius`" in ack.error
    # Answered, not held against the client (a person typing), and counted.
    assert s.state == "active" and s.counters["live_control_invalid"] == 8
    # Not a control with an id: the generic error, a bad message as before.
    junk = b'{"type":"control","set":{}}'
    (err,) = sent(s.control(len(junk).to_bytes(4, "big") + junk, T0))
    assert isinstance(err, p.Error) and err.code == "bad_message"


def test_controls_reach_the_simulator_at_the_live_control_rate() -> None:
    s = active(Limits(max_live_control_rate=2, live_control_burst=3))
    relayed = refused = 0
    # 40 controls in 1 s, each acked before the next: the burst of 3 at once, then one a 0.5 s
    # (at 0.55 s; the next would be at 1.05 s).
    for i in range(40):
        acts = s.control(control(i, fps=30), T0 + i * 25 * MS)
        if any(isinstance(a, RelayControl) for a in acts):
            relayed += 1
            s.control_done(i, state(i))
        else:
            (ack,) = acks(acts)
            assert ack.error.startswith("rate") and "2 controls/s" in ack.error
            refused += 1
    assert relayed == 4 and refused == 36 and s.counters["live_control_rate"] == 36
    assert s.state == "active"


def test_a_flood_of_controls_is_closed_and_reaches_the_simulator_once() -> None:
    s = active(Limits(max_control_rate=50, max_bad_messages=10))
    acts = s.control(control(1, fps=30) * 10_000, T0 + MS)  # one chunk
    assert sum(isinstance(a, RelayControl) for a in acts) == 1
    assert len(acks(acts)) < 50  # the rest beyond the control rate went unread
    assert isinstance(acts[-1], Close) and acts[-1].code == p.CLOSE_TOO_MANY_ERRORS
    assert s._reader.pending == 0


def test_the_simulators_warning_reaches_the_client_in_answer_and_ack() -> None:
    """Why a session's L2 may be wrong (a background with the ball's colour): passed on, cut
    to what the protocol carries."""
    s = ready()
    s.control(p.frame(p.Offer(sdp="v=0 offer sdp")), T0 + MS)
    (answer,) = sent(s.relay_done("v=0 answer", "H264", SessionParams(fps=60.0), "w" * 600))
    assert isinstance(answer, p.Answer) and answer.warning == "w" * 500
    s.control(control(1, background="warm"), T0 + 2 * MS)
    warm = msgspec.structs.replace(state(1), warning="background: 0.18 of its chroma samples")
    (ack,) = acks(s.control_done(1, warm))
    assert ack.ok and ack.warning == "background: 0.18 of its chroma samples"
    s.control(control(2, background="plain"), T0 + 3 * MS)
    (ack,) = acks(s.control_done(2, state(2)))
    assert ack.ok and ack.warning == ""
