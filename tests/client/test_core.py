"""The client's protocol core (no network): what it sends back, when the session is answered,
refused or ended, and what it keeps of the live results."""

from __future__ import annotations

import math

from carom import protocol as p
from carom import schemas
from carom.signaling import SessionControl, SessionParams
from carom_client.core import Acked, Answered, ClientCore, Refused, Reply

ANSWER = p.Answer(sdp="v=0", codec="H264", params=SessionParams())


def _result(frame: int, status: schemas.Status = "ok") -> bytes:
    ok = status == "ok"
    return p.encode_result(
        schemas.FrameResult(
            frame=frame, rtp_ts=3000 * frame, status=status, truth_x=1.0, truth_y=2.0,
            x=1.0 if ok else None, y=2.0 if ok else None, l2=0.0 if ok else None,
            session_id="s", t_render_ns=1, t_computed_ns=2,
        )
    )  # fmt: skip


def test_hello_carries_the_session_and_its_params() -> None:
    core = ClientCore("s1", SessionParams(fps=60))
    assert core.hello() == p.Hello(session_id="s1", params=SessionParams(fps=60), client="carom-py")


def test_a_ping_gets_its_pong_with_this_clock() -> None:
    core = ClientCore("s1")
    assert core.control(p.Ping(id=7, t_server_ns=1), 1234.5, 1.2) == [
        Reply(p.Pong(id=7, t_client_ms=1234.5))
    ]
    assert core.counters["control_ping"] == 1


def test_the_answer_is_applied_once_and_streaming_begins() -> None:
    core = ClientCore("s1")
    assert core.state == "negotiating"
    assert core.control(ANSWER, 0, 0) == [Answered(ANSWER)]
    assert core.answer == ANSWER and str(core.state) == "streaming"
    other = p.Answer(sdp="v=1", codec="VP8", params=SessionParams())
    assert core.control(other, 0, 0) == []  # a second answer is ignored
    assert core.answer == ANSWER


def test_an_error_before_the_answer_refuses_the_session_after_it_is_only_kept() -> None:
    refused = ClientCore("s1")
    err = p.Error(code="simulator_unavailable", message="down")
    assert refused.control(err, 0, 0) == [Refused("simulator_unavailable", "down")]
    streaming = ClientCore("s2")
    streaming.control(ANSWER, 0, 0)
    assert streaming.control(err, 0, 0) == [] and streaming.errors == [err]


def test_a_stream_closed_before_the_answer_is_a_refusal_once() -> None:
    core = ClientCore("s1")
    assert core.closed() == [Refused("closed", "the router closed the session")]
    assert core.closed() == [] and core.state == "ended"
    answered = ClientCore("s2")
    answered.control(ANSWER, 0, 0)
    assert answered.closed("gone") == []


def test_reports_are_numbered_in_order() -> None:
    core = ClientCore("s1")
    first = p.decode_report(core.report(3000, (10.0, 20.0), 1.0, 2.0))
    second = p.decode_report(core.report(6000, None, math.nan, math.nan))
    assert (first.seq, first.rtp_ts, first.x, first.y) == (0, 3000, 10.0, 20.0)
    assert (second.seq, second.detected) == (1, False)


def test_results_are_kept_bounded_and_bad_datagrams_counted() -> None:
    core = ClientCore("s1", keep_results=2)
    assert [core.result(_result(i)) is not None for i in range(3)] == [True] * 3
    assert [r.frame for r in core.results] == [0, 1]
    assert core.result(b"\x01\x02") is None and core.counters["bad_datagrams"] == 1


def test_coverage_and_results_in_follow_the_end() -> None:
    core = ClientCore("s1")
    core.control(ANSWER, 0, 0)
    for i, status in enumerate(("ok", "ok", "missed")):
        core.result(_result(i, status))  # type: ignore[arg-type]
    assert core.coverage() is None and not core.results_in()
    core.control(p.End(complete=True, frames_due=4), 0, 0)
    assert core.state == "ended" and not core.results_in()
    coverage = core.coverage()
    assert coverage is not None and (coverage.due, coverage.ok, coverage.no_row) == (4, 2, 1)
    core.result(_result(3, "ok"))
    assert core.results_in()


def test_statuses_are_stamped_and_degraded_follows_the_latest_word() -> None:
    core = ClientCore("s1")
    core.control(p.Status(state="degraded", part="broker", detail="lost"), 0, 10.0)
    core.control(p.Status(state="degraded", part="tracker", detail="silent"), 0, 11.0)
    core.control(p.Status(state="recovered", part="broker", detail="back"), 0, 12.0)
    assert [t for t, _ in core.statuses] == [10.0, 11.0, 12.0]
    assert core.degraded == {"tracker": "silent"}
    core.control(p.ClockEstimate(offset_ms=0.5, rtt_ms=1.0), 0, 13.0)
    assert core.clock is not None and core.clock.offset_ms == 0.5


def test_controls_are_numbered_and_their_acks_handed_back() -> None:
    core = ClientCore("s1", SessionParams(fps=60))
    core.control(ANSWER, 0, 0)
    first = core.live_control(SessionControl(state="stopped"))
    second = core.live_control(SessionControl(fps=30))
    assert (first.id, second.id) == (0, 1) and first.set == SessionControl(state="stopped")
    in_force = SessionParams(fps=60, width=640, height=480)
    ok = p.ControlAck(id=0, ok=True, state="stopped", phase=1, params=in_force)
    assert core.control(ok, 0, 0) == [Acked(ok)]
    assert (core.stream_state, core.phase, core.params) == ("stopped", 1, in_force)
    refused = p.ControlAck(id=1, ok=False, error="busy: control 0 is still in flight")
    assert core.control(refused, 0, 0) == [Acked(refused)]
    assert (core.stream_state, core.phase) == ("stopped", 1)  # a refusal changes nothing
    assert core.counters["control_controlack"] == 2
