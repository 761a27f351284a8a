"""The router's Prometheus metrics, read from its live state at each scrape.

A ``Collector`` rather than metric objects updated on the hot path: sessions count in their own
``Counter``s (``SessionCore.counters``, ``Router.counters``), and the scrape adds them up, so a
report costs no metrics call. A session's counters join the router's when it closes
(``Router.forget``), so totals never go down.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carom import protocol as p

if TYPE_CHECKING:
    from carom_router.router import Router


class RouterMetrics(Collector):
    """Reads the router's counters, sessions and publisher at each scrape; keeps nothing."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        r = self.router
        yield GaugeMetricFamily("carom_router_sessions", "Open sessions", value=len(r.links))
        rejected = CounterMetricFamily(
            "carom_router_reports_rejected", "Reports dropped, by reason", labels=["reason"]
        )
        events = CounterMetricFamily("carom_router_events", "Router events", labels=["event"])
        controls = CounterMetricFamily(
            "carom_router_controls",
            "Live controls (control messages), by outcome: ok, or why not",
            labels=["outcome"],
        )
        totals = Counter(r.counters)
        for link in r.links:
            for k, v in link.core.counters.items():
                totals[f"session_{k}"] += v
        for key, value in sorted(totals.items()):
            if key.startswith("session_invalid_"):
                rejected.add_metric([key.removeprefix("session_invalid_")], value)
            elif key.startswith("session_live_control_"):
                controls.add_metric([key.removeprefix("session_live_control_")], value)
            else:
                events.add_metric([key], value)
        yield rejected
        yield events
        yield controls
        transport = CounterMetricFamily(
            "carom_router_webtransport", "WebTransport/QUIC layer counters", labels=["counter"]
        )
        if r.server is not None:
            for key, value in sorted(r.server.counters.items()):
                transport.add_metric([key], value)
        yield transport
        yield GaugeMetricFamily(
            "carom_router_quic_connections",
            "QUIC connections open (handshaking, serving a session, or closing)",
            value=r.server.connections_open if r.server is not None else 0,
        )
        pub = r.publisher
        out = CounterMetricFamily(
            "carom_router_reports_published",
            "Messages to the centroid topic (reports, and the pages' stats)",
            labels=["outcome"],
        )
        # "resent": sent again by a producer made again (Publisher.replace), not new messages.
        for name in ("sent", "acked", "failed", "dropped", "resent"):
            out.add_metric([name], getattr(pub, name) if pub else 0)
        yield out
        yield GaugeMetricFamily(
            "carom_router_reports_queued",
            "Reports and stats accepted, not yet confirmed by the broker (in memory or spooled)",
            value=pub.queued if pub else 0,
        )
        up = GaugeMetricFamily(
            "carom_router_dependency_up", "1 while a part sessions need is up", labels=["part"]
        )
        now = time.monotonic()
        report = r.deps.report(now, 0)
        for part in p.STATUS_PARTS:
            state = report[part]
            assert isinstance(state, dict)
            up.add_metric([part], float(state["state"] in ("up", "connected")))
        yield up
        browser = GaugeMetricFamily(
            "carom_router_browser_stats",
            "WebRTC receiver stats the page sends (getStats)",
            labels=["session", "stat"],
        )
        for link in r.links:
            st = link.core.stats
            if st is None or not link.core.session_id:
                continue
            for name in (
                "fps",
                "jitter_buffer_ms",
                "decode_ms",
                "frames_received",
                "frames_decoded",
                "frames_dropped",
                "freeze_count",
                "freezes_ms",
                "bytes_received",
                "width",
                "height",
            ):
                value = getattr(st, name)
                if value is not None:
                    browser.add_metric([link.core.session_id, name], float(value))
        yield browser
        clock = GaugeMetricFamily(
            "carom_router_clock_offset_ms", "Server - client clock offset", labels=["session"]
        )
        for link in r.links:
            if link.core.session_id and link.core.clock.known:
                clock.add_metric([link.core.session_id], link.core.clock.offset_ns / 1e6)
        yield clock
        yield from _channels(r)


def _channels(r: Router) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Per type (the route's name, or ``unknown``): messages by outcome, bytes, queue, latency."""
    hub = r.channels
    messages = CounterMetricFamily(
        "carom_router_channel_messages",
        "Channel messages by type and outcome: accepted, published, failed (after retries), "
        "retried, refused_<code>",
        labels=["type", "outcome"],
    )
    size = CounterMetricFamily(
        "carom_router_channel_bytes", "Payload bytes of accepted channel messages", labels=["type"]
    )
    queue = GaugeMetricFamily(
        "carom_router_channel_queue",
        "Channel messages waiting for the broker (in flight, in memory, spooled)",
        labels=["type"],
    )
    latency = GaugeMetricFamily(
        "carom_router_channel_publish_latency_ms",
        "send_async -> broker confirmation over the last CSV interval",
        labels=["type", "quantile"],
    )
    depth = hub.queue_depth()
    for label, st in sorted(hub.by_type.items()):
        for outcome, n in sorted(st.counters.items()):
            if outcome == "bytes":
                continue
            messages.add_metric([label, outcome], n)
        size.add_metric([label], st.counters["bytes"])
        queue.add_metric([label], depth[label])
        for q, v in (("0.5", st.last_p50_ms), ("0.99", st.last_p99_ms)):
            if v == v:  # not NaN
                latency.add_metric([label, q], v)
    yield messages
    yield size
    yield queue
    yield latency
    reloads = CounterMetricFamily(
        "carom_router_routes_reloads",
        "Routes file reloads by outcome (ok; refused: the old routes kept)",
        labels=["outcome"],
    )
    for outcome in ("ok", "refused"):
        reloads.add_metric([outcome], hub.reloads[outcome])
    yield reloads
    yield GaugeMetricFamily(
        "carom_router_routes", "Routes (types) in force", value=len(hub.routes.routes)
    )
    events = CounterMetricFamily(
        "carom_router_channel_events",
        "Typed channels' other events: bad streams (bad_<code>), ends published, producer "
        "errors, publishes given up after their retries",
        labels=["event"],
    )
    for key, value in sorted(hub.counters.items()):
        events.add_metric([key], value)
    yield events
