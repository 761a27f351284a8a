"""The simulator's settings (see carom_runtime.config for how file, env and flags fill them)."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from carom import impairment
from carom.schemas import playout_delay
from carom_runtime.config import HttpSettings, PulsarSettings

SERVICE = "simulator"


class SessionDefaults(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Parameters a session gets when its offer does not set them (the constant-speed set-up)."""

    fps: float = 30.0
    width: int = 640
    height: int = 480
    radius: float = 20.0
    gravity: float = 0.0
    vx: float = 1000.0
    vy: float = 1000.0
    cor: float = 1.0
    #: None: a fresh random seed per session.
    seed: int | None = None
    #: Playout mode (carom.schemas.Latency): "smooth" (the browser's default buffering),
    #: "interactive" (render on decode, about half the latency) or "MIN-MAX" ms.
    latency: str = "smooth"
    #: Target bitrate in bits/s; 0: the encoder's own (aiortc: 1 Mbps, then the browser's REMB).
    bitrate: int = 0
    #: A keyframe every this many frames; 0: only when the browser asks (PLI/FIR).
    keyframe_interval: int = 0
    #: What the ball is drawn over: "plain" (black) or a video-file background by name.
    background: str = "plain"
    #: The emulated network (carom.impairment), by profile name; None: none (a clear loopback).
    network: str | None = None

    def __post_init__(self) -> None:
        playout_delay(self.latency)
        if self.network is not None and self.network not in impairment.PROFILES:
            known = ", ".join(impairment.PROFILES)
            raise ValueError(f"network: no profile {self.network!r}; known: {known}")


class BackgroundSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where video-file backgrounds come from (``carom_simulator.background``)."""

    #: A folder of your own clips: background ``<name>`` is ``<directory>/<name>.mp4`` (or
    #: .webm, .mkv). Empty: only the built-in ``texture`` and ``warm``.
    directory: str = ""
    #: Where the built-in clips are generated on first use. Empty: ~/.cache/carom/backgrounds.
    cache_dir: str = ""


class IceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Addresses aiortc gathers host candidates on. 127.0.0.1 suits a browser on the same host;
    #: "auto" is aioice's own choice (all non-loopback interfaces), for a browser elsewhere.
    host_addresses: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1"])
    #: Optional STUN server "host:port" (an unreachable one delays every answer by ~5 s).
    stun_server: str | None = None


#: RFC 6750's b64token: what fits in ``Authorization: Bearer ...`` as it is.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


class AccessSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Who may use the session API (offer, list, delete): the router, by a shared secret.

    Found open (issue 14): anyone reaching the port listed every session and ended anyone's video
    with a DELETE. Loopback is no shelter: any local process, and any web page in a local browser
    (a form POST needs no CORS consent), can reach 127.0.0.1:8001.
    """

    #: The secret the router sends as ``Authorization: Bearer <token>`` (its ``simulator.token``);
    #: at least 16 characters of [A-Za-z0-9._~+/-]. Set it by env
    #: (CAROM_SIMULATOR__ACCESS__TOKEN) rather than by flag, which `ps` shows. Make one with
    #: ``python3 -c 'import secrets; print(secrets.token_urlsafe(32))'``. Empty: no token, and
    #: the simulator refuses to start unless ``allow_no_token`` is true.
    token: str = ""
    #: Serve the session API to anyone, with no token: only for a machine nobody else reaches.
    allow_no_token: bool = False

    def __post_init__(self) -> None:
        if self.token and (len(self.token) < 16 or not _TOKEN.fullmatch(self.token)):
            raise ValueError(
                "`token` must be at least 16 characters of A-Z a-z 0-9 . _ ~ + / - (make one: "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )


def access_refusal(access: AccessSettings) -> str | None:
    """Why the simulator must not start with these access settings, or None.

    Not a check of the model itself: the shipped YAML has no token (a secret does not belong in
    a file in git), and each deployment supplies one by env.
    """
    if access.token or access.allow_no_token:
        return None
    return (
        "no access token: set access.token (env CAROM_SIMULATOR__ACCESS__TOKEN) to the token the "
        "router sends (its simulator.token), or set access.allow_no_token: true to serve the "
        "session API to anyone who reaches the port"
    )


class SimulatorSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pulsar: PulsarSettings = msgspec.field(default_factory=PulsarSettings)
    http: HttpSettings = msgspec.field(default_factory=lambda: HttpSettings(port=8001))
    ice: IceSettings = msgspec.field(default_factory=IceSettings)
    defaults: SessionDefaults = msgspec.field(default_factory=SessionDefaults)
    backgrounds: BackgroundSettings = msgspec.field(default_factory=BackgroundSettings)
    access: AccessSettings = msgspec.field(default_factory=AccessSettings)
    #: H264 is what Carom measures; VP8 only when asked for explicitly.
    codec: Literal["H264", "VP8"] = "H264"
    #: libx264 preset and threads per session (see carom_simulator.encoder for the figures).
    encoder_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = (
        "superfast"
    )
    encoder_threads: int = 1
    max_sessions: int = 16
    #: Threads that step the physics and render frames ahead of time, shared by all sessions.
    frame_workers: int = 2
    #: Seconds from the answer to "connected" before a session is closed and its slot freed.
    #: Connecting takes well under a second on a LAN (see README, "The simulator"); 30 s let 100
    #: offers that never connected hold 15 of 16 slots for half a minute (issue 14).
    connect_timeout_s: float = 5.0
    #: Largest request body (an offer: a few kB of SDP). Read chunk by chunk and refused (413)
    #: as soon as it is passed, never buffered whole.
    max_body_bytes: int = 128000
    #: Seconds a request body may take to arrive before it is refused (408): a body trickled a
    #: byte at a time would otherwise hold its connection and buffer for as long as it liked.
    body_timeout_s: float = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("`max_sessions` must be >= 1")
        if not 1 <= self.frame_workers <= 64:
            raise ValueError("`frame_workers` must be within 1..64")
        if not 0 <= self.encoder_threads <= 16:
            raise ValueError("`encoder_threads` must be within 0..16 (0 = one per core)")
        if self.connect_timeout_s <= 0:
            raise ValueError("`connect_timeout_s` must be > 0")
        if not 1024 <= self.max_body_bytes <= 16_000_000:
            raise ValueError("`max_body_bytes` must be within 1024..16000000")
        if self.body_timeout_s <= 0:
            raise ValueError("`body_timeout_s` must be > 0")
