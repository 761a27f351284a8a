"""The tracker's settings (see carom_runtime.config for how file, env and flags fill them)."""

from __future__ import annotations

from typing import Literal

import msgspec

from carom_runtime.config import HttpSettings, PulsarSettings

SERVICE = "tracker"
#: Pulsar's Key_Shared hash space: a key's hash is taken modulo this (ranges are inclusive).
KEY_HASH_RANGE = 65536


def sticky_range(spec: str) -> tuple[int, int]:
    """``"I/N"``: the I-th of N equal, inclusive ranges of the key hash space, N's last ending
    at its top. ``ValueError`` for anything else."""
    index, sep, count = spec.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"`key_range` must be I/N, e.g. 0/2, not {spec!r}") from None
    if not sep or not (1 <= n <= 256 and 0 <= i < n):
        raise ValueError(f"`key_range` must be I/N with 0 <= I < N <= 256, not {spec!r}")
    size = KEY_HASH_RANGE // n
    return i * size, (KEY_HASH_RANGE - 1 if i == n - 1 else (i + 1) * size - 1)


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
    #: Which sessions this replica joins. Empty: the broker splits them over whichever replicas
    #: are connected (auto-split), so replicas can come and go; but while they reconnect after a
    #: broker failover the first one back is given every session for a moment, and a message
    #: whose ack was lost in the failover is redelivered to another replica: frames joined on
    #: two replicas (rows twice), or a truth on one and its report on the other (false misses).
    #: ``I/N`` (e.g. ``0/2``): replica I of N owns hash range I of N of the sessions' keys
    #: (``sticky_range``) and no other replica is ever given them; a replica that is down holds
    #: its sessions back until it is back (a StatefulSet's pod I, say). Every replica of one
    #: subscription must use the same N.
    key_range: str = ""
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
        if self.key_range:
            sticky_range(self.key_range)  # raises ValueError naming the problem
        if self.run and (self.run in (".", "..") or "/" in self.run or "\\" in self.run):
            raise ValueError("`run` must be a plain folder name")
