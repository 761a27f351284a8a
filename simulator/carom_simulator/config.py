"""The simulator's settings (see carom.config for how file, env and flags fill them)."""

from __future__ import annotations

from typing import Literal

import msgspec

from carom.config import HttpSettings, PulsarSettings

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


class IceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Addresses aiortc gathers host candidates on. 127.0.0.1 suits a browser on the same host;
    #: "auto" is aioice's own choice (all non-loopback interfaces), for a browser elsewhere.
    host_addresses: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1"])
    #: Optional STUN server "host:port" (an unreachable one delays every answer by ~5 s).
    stun_server: str | None = None


class SimulatorSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pulsar: PulsarSettings = msgspec.field(default_factory=PulsarSettings)
    http: HttpSettings = msgspec.field(default_factory=lambda: HttpSettings(port=8001))
    ice: IceSettings = msgspec.field(default_factory=IceSettings)
    defaults: SessionDefaults = msgspec.field(default_factory=SessionDefaults)
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
    #: Seconds a session may take to connect before it is dropped.
    connect_timeout_s: float = 30.0
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
