"""The simulator's HTTP signaling contract, shared by the simulator, the router and the clients.

``POST /offer`` takes an ``OfferRequest`` and answers an ``Answer``; errors are
``{"detail": "..."}`` with a 4xx/5xx status. Services never import each other: this module is the
one place the contract is written down.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from carom.schemas import MAX_FRAME_SIDE, Latency, SessionId, playout_delay

Fps = Annotated[float, Meta(gt=0, le=240)]
Speed = Annotated[float, Meta(ge=-100_000, le=100_000, description="px/s")]
Accel = Annotated[float, Meta(ge=-100_000, le=100_000, description="px/s^2")]
Side = Annotated[int, Meta(ge=16, le=MAX_FRAME_SIDE, multiple_of=2)]


class SessionParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Per-session video and physics parameters; omitted ones take the simulator's defaults."""

    fps: Fps | None = None
    width: Side | None = None
    height: Side | None = None
    radius: Annotated[float, Meta(gt=0, le=MAX_FRAME_SIDE / 2)] | None = None
    gravity: Accel | None = None
    vx: Speed | None = None
    vy: Speed | None = None
    cor: Annotated[float, Meta(gt=0, le=1)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    #: Playout mode (``carom.schemas.Latency``): smooth, interactive or MIN-MAX ms. In an answer,
    #: the mode in force: ``smooth`` when the browser did not offer the playout-delay extension.
    latency: Latency | None = None

    def __post_init__(self) -> None:
        if self.latency is not None:
            playout_delay(self.latency)  # ValueError -> a validation error on decode


class OfferRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``POST /offer``: the router relays a client's offer as one of these."""

    session_id: SessionId
    sdp: Annotated[str, Meta(min_length=10, max_length=64_000)]
    type: Literal["offer"] = "offer"
    params: SessionParams = msgspec.field(default_factory=SessionParams)


class Answer(msgspec.Struct, kw_only=True):
    """The simulator's HTTP answer to ``POST /offer`` (the body of its 200).

    Not the WebTransport control message ``carom.protocol.Answer``: the router decodes this one
    and hands its ``sdp``, ``codec`` and ``params`` on to the client in that one.
    """

    session_id: SessionId
    sdp: str
    type: Literal["answer"] = "answer"
    codec: str
    #: The parameters in force for this session (defaults filled in).
    params: SessionParams


class SessionInfo(msgspec.Struct, kw_only=True):
    """One of the simulator's sessions, as ``GET /sessions`` lists them."""

    session_id: SessionId
    state: str
    created_ns: int
    params: SessionParams
    stats: dict[str, int | float | bool]


def auth_headers(token: str) -> dict[str, str]:
    """The headers that carry the simulator's access token on its session API (none if empty).

    The simulator answers offers, lists and deletes only with ``Authorization: Bearer <token>``
    (its ``access.token``; the router's ``simulator.token``).
    """
    return {"Authorization": f"Bearer {token}"} if token else {}
