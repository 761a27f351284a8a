"""The tracker's settings (see carom_runtime.config for how file, env and flags fill them)."""

from __future__ import annotations

from typing import Literal

import msgspec

from carom_runtime.config import HttpSettings, PulsarSettings

SERVICE = "tracker"


class TrackerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pulsar: PulsarSettings = msgspec.field(default_factory=PulsarSettings)
    http: HttpSettings = msgspec.field(default_factory=lambda: HttpSettings(port=8002))
    #: How long a truth waits for its report (and a report for its truth) before it is missed.
    window_s: float = 2.0
    #: CSV rows go to <metrics_dir>/<run>/<session_id>.csv.
    metrics_dir: str = "metrics"
    #: This run's folder name; empty: the UTC start time, e.g. 20260101T120000Z.
    run: str = ""
    #: Durable Key_Shared subscription: replicas sharing it split the sessions between them.
    subscription: str = "carom-tracker"
    #: Rows are fsynced, then their messages acked, this often (the price of a redelivery).
    #: Not in the hop's latency: a row is computed when joined, and the fsyncs and acks run on
    #: the sink's committer thread (measured: consumed -> computed p99 0.16-1.8 ms at 60-2,000
    #: frames/s with 200 ms, vs 4-17 ms while the join thread did the fsyncs). Shorter only
    #: means more fsyncs (a 16-file commit takes 5 ms p50, 13 ms p90 here).
    flush_interval_ms: int = 200
    #: Rows written but not yet durable that force an early flush (bounds unacked messages).
    max_pending_rows: int = 5000
    #: Per session, the last rows whose frames a restart checks before writing (redeliveries).
    dedupe_rows: int = 20000
    #: Join memory: sessions with a message waiting, and waiting messages per session and kind.
    join_max_sessions: int = 256
    join_max_pending: int = 8192
    #: CSV files kept open at once (least recently written closed first).
    max_open_files: int = 64
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        if not 0 < self.window_s <= 600:
            raise ValueError("`window_s` must be within (0, 600]")
        if not 1 <= self.flush_interval_ms <= 60_000:
            raise ValueError("`flush_interval_ms` must be within 1..60000")
        for name in ("max_pending_rows", "join_max_sessions", "join_max_pending", "max_open_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1")
        if self.dedupe_rows < 2 * self.max_pending_rows:
            raise ValueError("`dedupe_rows` must be at least 2 x `max_pending_rows`")
        if not self.subscription:
            raise ValueError("`subscription` must not be empty")
        if self.run and (self.run in (".", "..") or "/" in self.run or "\\" in self.run):
            raise ValueError("`run` must be a plain folder name")
