"""The simulator relays of ``carom_router.link.Link``, in memory: aioquic and the simulator faked.

The relays speak ``carom.signaling``: an ``OfferRequest`` goes out, the simulator's ``Answer`` is
decoded and validated, and whatever goes wrong reaches the client as one ``error``; a live
control goes out as a ``SessionControl`` (``PATCH``), its ``SessionState`` comes back, and
whatever happens reaches the client as one ``control_ack``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec

from carom import protocol as p
from carom.signaling import Answer, OfferRequest, SessionControl, SessionParams, SessionState
from carom_router.config import RouterSettings
from carom_router.link import Link


class FakeSession:
    """What a ``Link`` uses of ``WebTransportSession``: the control stream's bytes are kept."""

    def __init__(self) -> None:
        self.sent = b""
        self.is_closed = False

    def send_stream(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.sent += data

    def close(self, code: int = 0, reason: str = "") -> None:
        self.is_closed = True

    def messages(self) -> list[p.RouterMessage]:
        return [p.parse_router(body) for body in p.FrameReader().feed(self.sent)]


def relay(
    simulator: Callable[[httpx.Request], httpx.Response], *controls: p.Control
) -> list[p.RouterMessage]:
    """Hello and offer from a client, then ``controls`` one after another (each once the last is
    answered); the messages it got once the relays are over."""
    settings = RouterSettings()
    router = SimpleNamespace(
        settings=settings,
        limits=settings.limits,
        counters=Counter[str](),
        register=lambda link: None,
        forget=lambda link, reason: None,
    )
    wt = FakeSession()

    async def run() -> None:
        router.http = httpx.AsyncClient(transport=httpx.MockTransport(simulator))
        link = Link(router, wt, "192.0.2.1")  # type: ignore[arg-type]
        hello = p.Hello(session_id="s1", params=SessionParams(fps=60))
        link.stream_data(0, p.frame(hello) + p.frame(p.Offer(sdp="v=0 offer sdp")), False)
        await asyncio.gather(*link._tasks)
        for c in controls:
            link.stream_data(0, p.frame(c), False)
            await asyncio.gather(*link._tasks)
        await router.http.aclose()

    asyncio.run(run())
    return [m for m in wt.messages() if not isinstance(m, p.Welcome | p.Ping)]


def test_the_offer_goes_out_as_an_offer_request_and_the_answer_comes_back() -> None:
    seen: list[OfferRequest] = []

    def simulator(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/json"
        seen.append(msgspec.json.decode(request.content, type=OfferRequest))
        answer = Answer(
            session_id="s1", sdp="v=0 answer", codec="H264", params=SessionParams(fps=60)
        )
        return httpx.Response(200, content=msgspec.json.encode(answer))

    assert relay(simulator) == [
        p.Answer(sdp="v=0 answer", codec="H264", params=SessionParams(fps=60))
    ]
    assert seen == [
        OfferRequest(session_id="s1", sdp="v=0 offer sdp", params=SessionParams(fps=60))
    ]


def test_a_refusal_is_told_with_the_simulators_detail() -> None:
    (err,) = relay(lambda r: httpx.Response(400, json={"detail": "no H264 in the offer"}))
    assert err == p.Error(code="simulator_400", message="no H264 in the offer")


def test_an_answer_that_is_not_the_contracts_is_told_not_relayed() -> None:
    def simulator(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"session_id": "s1", "sdp": "v=0 answer"})  # no codec

    (err,) = relay(simulator)
    assert isinstance(err, p.Error) and err.code == "simulator_unavailable"
    assert "not a valid answer" in err.message and "codec" in err.message


def test_an_unreachable_simulator_is_told() -> None:
    def simulator(request: httpx.Request) -> Any:
        raise httpx.ConnectError("refused", request=request)

    (err,) = relay(simulator)
    assert isinstance(err, p.Error) and err.code == "simulator_unavailable"


ANSWER = Answer(session_id="s1", sdp="v=0 answer", codec="H264", params=SessionParams(fps=60))
IN_FORCE = SessionParams(fps=30, width=640, height=480)


def simulator_with(
    patch: Callable[[httpx.Request], httpx.Response],
) -> Callable[[httpx.Request], httpx.Response]:
    """A simulator that answers the offer, and PATCHes with ``patch``."""

    def simulator(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, content=msgspec.json.encode(ANSWER))
        return patch(request)

    return simulator


def control_acks(
    patch: Callable[[httpx.Request], httpx.Response], *sets: SessionControl
) -> list[p.RouterMessage]:
    controls = [p.Control(id=i, set=c) for i, c in enumerate(sets)]
    return [m for m in relay(simulator_with(patch), *controls) if not isinstance(m, p.Answer)]


def test_a_control_goes_out_as_a_patch_and_its_state_comes_back_in_the_ack() -> None:
    seen: list[tuple[str, str, SessionControl]] = []

    def patch(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/json"
        body = msgspec.json.decode(request.content, type=SessionControl)
        seen.append((request.method, request.url.path, body))
        state = SessionState(session_id="s1", state="stopped", phase=len(seen), params=IN_FORCE)
        return httpx.Response(200, content=msgspec.json.encode(state))

    acks = control_acks(patch, SessionControl(state="stopped"), SessionControl(fps=30))
    assert acks == [
        p.ControlAck(id=0, ok=True, state="stopped", phase=1, params=IN_FORCE),
        p.ControlAck(id=1, ok=True, state="stopped", phase=2, params=IN_FORCE),
    ]
    # Only the fields set (omitted: unchanged), to the session's own resource.
    assert seen == [
        ("PATCH", "/sessions/s1", SessionControl(state="stopped")),
        ("PATCH", "/sessions/s1", SessionControl(fps=30)),
    ]
    assert msgspec.json.encode(SessionControl(fps=30)) == b'{"fps":30}'


def test_a_refused_control_is_acked_with_the_simulators_detail() -> None:
    (ack,) = control_acks(
        lambda r: httpx.Response(422, json={"detail": "background: no video named nosuch"}),
        SessionControl(background="nosuch"),
    )
    assert ack == p.ControlAck(id=0, ok=False, error="background: no video named nosuch")
    (ack,) = control_acks(  # FastAPI's own 422: a list of errors, passed on as JSON
        lambda r: httpx.Response(422, json={"detail": [{"loc": ["body", "fps"], "msg": "bad"}]}),
        SessionControl(fps=10),
    )
    assert isinstance(ack, p.ControlAck) and not ack.ok and '"fps"' in ack.error
    (ack,) = control_acks(
        lambda r: httpx.Response(404, json={"detail": "no session s1"}), SessionControl(fps=10)
    )
    assert ack == p.ControlAck(id=0, ok=False, error="no session s1")


def test_a_simulator_that_cannot_answer_a_control_is_told_as_unavailable() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    cases: dict[str, Callable[[httpx.Request], httpx.Response]] = {
        "no answer within 15 s": timeout,
        "ConnectError: refused": down,
        "HTTP 500: boom": lambda r: httpx.Response(500, text="boom"),
        "not a valid session state": lambda r: httpx.Response(200, json={"state": "streaming"}),
    }
    for said, patch in cases.items():
        # The next control goes through: a failure leaves nothing in flight.
        acks = control_acks(patch, SessionControl(fps=10), SessionControl(fps=20))
        assert [a.id for a in acks if isinstance(a, p.ControlAck)] == [0, 1], acks
        for ack in acks:
            assert isinstance(ack, p.ControlAck) and not ack.ok
            assert ack.error.startswith("simulator unavailable: ") and said in ack.error, ack
