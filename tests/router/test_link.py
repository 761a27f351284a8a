"""The simulator relay of ``carom_router.link.Link``, in memory: aioquic and the simulator faked.

The relay speaks ``carom.signaling``: an ``OfferRequest`` goes out, the simulator's ``Answer`` is
decoded and validated, and whatever goes wrong reaches the client as one ``error``.
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
from carom.signaling import Answer, OfferRequest, SessionParams
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


def relay(simulator: Callable[[httpx.Request], httpx.Response]) -> list[p.RouterMessage]:
    """Hello and offer from a client; the messages it got once the relay is over."""
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
