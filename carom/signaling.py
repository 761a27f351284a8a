"""The simulator's HTTP signaling contract, shared by the simulator, the router and the clients.

``POST /offer`` takes an ``OfferRequest`` and answers an ``Answer``; errors are
``{"detail": "..."}`` with a 4xx/5xx status. Services never import each other: this module is the
one place the contract is written down.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from carom import impairment
from carom.impairment import Profile
from carom.schemas import MAX_FRAME_SIDE, Latency, SessionId, playout_delay

Fps = Annotated[float, Meta(gt=0, le=240)]
Speed = Annotated[float, Meta(ge=-100_000, le=100_000, description="px/s")]
Accel = Annotated[float, Meta(ge=-100_000, le=100_000, description="px/s^2")]
Side = Annotated[int, Meta(ge=16, le=MAX_FRAME_SIDE, multiple_of=2)]
Cor = Annotated[float, Meta(gt=0, le=1)]
Bitrate = Annotated[int, Meta(ge=0, le=50_000_000, description="target bits/s; 0: the encoder's")]
"""An encoder's target bitrate, at least :data:`MIN_BITRATE`; 0 means the encoder's own (aiortc
starts at 1 Mbps for H.264 and follows the browser's REMB within 0.5-3 Mbps)."""
MIN_BITRATE = 50_000


def _check(bitrate: int | None, latency: str | None, network: str | Profile | None = None) -> None:
    """What a field's annotation cannot say: raised in ``__post_init__``, so a decode fails."""
    if bitrate is not None and 0 < bitrate < MIN_BITRATE:
        raise ValueError(f"bitrate: 0 (the encoder's own) or at least {MIN_BITRATE} bits/s")
    if latency is not None:
        playout_delay(latency)  # the pattern alone lets 90-10 or 5-7 through
    if isinstance(network, str) and network not in impairment.PROFILES:
        known = ", ".join(impairment.PROFILES)
        raise ValueError(f"network: no profile {network!r}; known: {known}")


KeyframeInterval = Annotated[int, Meta(ge=0, le=100_000, description="frames; 0: the encoder's")]
Background = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
        description="plain, or the name of a video-file background the simulator knows",
    ),
]
StreamState = Literal["streaming", "stopped"]
"""Whether a session's stream is running. A stopped session keeps its peer connection and its
WebTransport session; no frame is due while it is stopped (docs/accounting.md)."""


class SessionParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Per-session video and physics parameters; omitted ones take the simulator's defaults."""

    fps: Fps | None = None
    width: Side | None = None
    height: Side | None = None
    radius: Annotated[float, Meta(gt=0, le=MAX_FRAME_SIDE / 2)] | None = None
    gravity: Accel | None = None
    vx: Speed | None = None
    vy: Speed | None = None
    cor: Cor | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    #: Target bitrate in bits/s; 0: the encoder's own (see ``Bitrate``).
    bitrate: Bitrate | None = None
    #: A keyframe every this many frames; 0: the encoder's own choice (aiortc: only on PLI/FIR).
    keyframe_interval: KeyframeInterval | None = None
    #: What the ball is drawn over: ``plain`` or a named video-file background.
    background: Background | None = None
    #: Playout mode (``carom.schemas.Latency``): smooth, interactive or MIN-MAX ms. In an answer,
    #: the mode in force: ``smooth`` when the browser did not offer the playout-delay extension.
    latency: Latency | None = None
    #: The session's emulated network (``carom.impairment``): a profile's name, or its fields.
    #: The simulator applies ``media`` to the RTP and RTCP it sends and receives, the router
    #: ``reports`` to the client's datagrams and ``results`` to its own.
    network: str | Profile | None = None

    def __post_init__(self) -> None:
        _check(self.bitrate, self.latency, self.network)

    @property
    def impairment(self) -> Profile:
        """The emulated network in force: ``clear`` when none was asked for."""
        if self.network is None:
            return impairment.PROFILES["clear"]
        return impairment.PROFILES[self.network] if isinstance(self.network, str) else self.network


class SessionControl(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A change to a running session: the body of ``PATCH /sessions/{id}``.

    Omitted fields stay as they are. ``state`` stops or resumes the stream without closing the
    session (a stopped stream frees its encoder and frame generation; no frame is due while
    stopped). Every other field takes effect at the next frame and starts a new *phase*: frames
    carry their phase number, and the session's phases (parameters in force and what was sent)
    end up in the tracker's report (``network`` too: the simulator's media path and the
    router's report and result paths all change). ``radius`` and ``seed`` are fixed at the
    offer. ``latency``
    other than ``smooth`` needs a browser that offered the playout-delay extension (409 if not).
    """

    state: StreamState | None = None
    fps: Fps | None = None
    width: Side | None = None
    height: Side | None = None
    bitrate: Bitrate | None = None
    keyframe_interval: KeyframeInterval | None = None
    gravity: Accel | None = None
    vx: Speed | None = None
    vy: Speed | None = None
    cor: Cor | None = None
    background: Background | None = None
    latency: Latency | None = None
    #: The emulated network from now on (``SessionParams.network``): a profile's name or its
    #: fields. Packets already on the emulated wire arrive as the old profile said.
    network: str | Profile | None = None

    def __post_init__(self) -> None:
        _check(self.bitrate, self.latency, self.network)


class SessionState(msgspec.Struct, kw_only=True):
    """A session's state after a control: the answer of ``PATCH /sessions/{id}``."""

    session_id: SessionId
    state: StreamState
    #: The phase now in force (0 at the offer; +1 at every change or resume).
    phase: int
    #: The parameters now in force.
    params: SessionParams
    #: Why the L2 figures of this phase may be wrong, for people (e.g. a background with the
    #: ball's colour in it: ``carom_simulator.background.check_background``); empty when none.
    warning: str = ""


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
    #: As ``SessionState.warning``: why this session's L2 figures may be wrong; empty when none.
    warning: str = ""


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
