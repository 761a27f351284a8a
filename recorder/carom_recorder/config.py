"""The recorder's settings (see carom_runtime.config for how file, env and flags fill them)."""

from __future__ import annotations

from typing import Literal

import msgspec

from carom_runtime.config import HttpSettings, PulsarSettings

SERVICE = "recorder"


class RecorderSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pulsar: PulsarSettings = msgspec.field(default_factory=PulsarSettings)
    http: HttpSettings = msgspec.field(default_factory=lambda: HttpSettings(port=8003))
    #: The router's routes file: the recorder subscribes to every route's topic in it (read at
    #: start; a restart picks up a changed file).
    routes_file: str = "router/routes.yaml"
    #: Recordings go to <out_dir>/<session_id>/<type>.* (docs in carom_recorder.store).
    out_dir: str = "recordings"
    #: Durable Key_Shared subscription on every route's topic: replicas sharing it split the
    #: sessions, each session's messages of a type on one replica.
    subscription: str = "carom-recorder"
    #: A type of a session that has had no message for this long, and no ChannelEnd, is
    #: finalized anyway (media file and summary, marked incomplete); a later message reopens it.
    idle_finalize_s: float = 30.0
    #: Received but not yet written messages one topic's consumer may hold, in bytes: a topic's
    #: prefetch is this over its route's max_message_bytes (1..1000 messages).
    prefetch_bytes: int = 64 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        if not 0 < self.idle_finalize_s <= 86_400:
            raise ValueError("`idle_finalize_s` must be within (0, 86400]")
        if not self.subscription:
            raise ValueError("`subscription` must not be empty")
        if not self.routes_file:
            raise ValueError("`routes_file` must not be empty")
        if not self.out_dir:
            raise ValueError("`out_dir` must not be empty")
        if self.prefetch_bytes < 1024 * 1024:
            raise ValueError("`prefetch_bytes` must be >= 1048576")
