"""The tracker's HTTP shell: health and Prometheus metrics around the consume-join-write engine.

Everything stateful is built in the lifespan and torn down there, in reverse: the engine first (no
more receiving; what is joined is written, fsynced and acked; the unjoined stay unacked), then the
error producer is drained, then the Pulsar client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pulsar
from fastapi import FastAPI, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carom_runtime.pulsar_io import (
    Publisher,
    connect_at_start,
    ensure_topics,
    make_client,
    make_publisher,
)
from carom_runtime.service import add_metrics, health_response
from carom_tracker.config import TrackerSettings
from carom_tracker.consumer import Engine, run_name

log = logging.getLogger("carom.tracker")

_GAUGES = frozenset({"pending_truth", "pending_reports", "sessions", "finalised_keys"})


@dataclass
class State:
    settings: TrackerSettings
    run_dir: Path
    engine: Engine | None = None
    publisher: Publisher | None = None
    started: float = field(default_factory=time.monotonic)


class _Metrics(Collector):
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        engine = self.state.engine
        if engine is None:
            return
        counts = engine.join_counts
        j = CounterMetricFamily("carom_tracker_join", "Joiner outcomes", labels=["counter"])
        g = GaugeMetricFamily("carom_tracker_join_held", "Held by the joiner", labels=["what"])
        for key, value in sorted(counts.items()):
            (g if key in _GAUGES else j).add_metric([key], value)
        yield j
        yield g
        c = engine.counters
        m = CounterMetricFamily(
            "carom_tracker_messages", "Messages consumed", labels=["topic", "outcome"]
        )
        for idx, topic in enumerate(("truth", "centroids")):
            m.add_metric([topic, "received"], c.received[idx])
            m.add_metric([topic, "invalid"], c.invalid[idx])
        yield m
        a = CounterMetricFamily(
            "carom_tracker_align_wait_seconds",
            "Time a topic's receiver held a batch for the other topic to catch up (backlogs)",
            labels=["topic"],
        )
        for idx, topic in enumerate(("truth", "centroids")):
            a.add_metric([topic], c.align_wait_s[idx])
        yield a
        sink = engine.sink
        r = CounterMetricFamily("carom_tracker_rows", "CSV rows", labels=["outcome"])
        r.add_metric(["written"], sink.rows_written)
        r.add_metric(["durable"], sink.rows_durable)
        r.add_metric(["orphans_skipped"], c.orphans)
        r.add_metric(["duplicates_skipped"], sink.duplicates_skipped)
        yield r
        rec = CounterMetricFamily(
            "carom_tracker_session_records",
            "A session's end (phases) and browser stats, beside its CSV",
            labels=["outcome"],
        )
        rec.add_metric(["written"], sink.records_written)
        rec.add_metric(["duplicates_skipped"], sink.records_skipped)
        yield rec
        yield CounterMetricFamily(
            "carom_tracker_client_stats", "Browser stats (ClientStats) consumed",
            value=c.client_stats,
        )  # fmt: skip
        yield CounterMetricFamily(
            "carom_tracker_acks", "Messages acknowledged after their rows were durable",
            value=sink.acked,
        )  # fmt: skip
        yield GaugeMetricFamily("carom_tracker_open_files", "CSV files open", value=sink.open_files)
        e = CounterMetricFamily(
            "carom_tracker_errors_published",
            "Live results to Pulsar: sent/acked/failed/dropped/resent count messages (one carries "
            "a commit's results of a session), the others results",
            labels=["outcome"],
        )
        pub = self.state.publisher
        e.add_metric(["sent"], pub.sent if pub else 0)
        e.add_metric(["acked"], pub.acked if pub else 0)
        e.add_metric(["failed"], pub.failed if pub else 0)
        e.add_metric(["dropped_backlog"], pub.dropped if pub else 0)
        e.add_metric(["resent"], pub.resent if pub else 0)  # by a producer made again
        e.add_metric(["dropped_no_producer"], c.errors_not_published)
        e.add_metric(["refused_spool_full"], c.errors_refused)
        e.add_metric(["redelivery_unchecked"], c.republish_unchecked)
        yield e
        yield GaugeMetricFamily(
            "carom_tracker_errors_queued",
            "Live results accepted and not yet confirmed by the broker (memory + spool)",
            value=pub.queued if pub else 0,
        )
        yield CounterMetricFamily(
            "carom_tracker_broker_outages",
            "Times the Pulsar link was lost",
            value=engine.link.outages,
        )


def create_app(settings: TrackerSettings) -> FastAPI:
    run_dir = Path(settings.metrics_dir) / run_name(settings)
    run_dir.mkdir(parents=True, exist_ok=True)  # fail at start (exit 2) if it cannot be made
    state = State(settings, run_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="carom-pulsar-setup") as setup:
            client = make_client(settings.pulsar)

            def connect() -> Engine:
                ensure_topics(settings.pulsar)  # partitioned, if the config says so
                publisher = make_publisher(
                    client, settings.pulsar.topics.errors, settings.pulsar, "tracker"
                )
                engine: Engine | None = None
                try:
                    engine = Engine(settings, client, run_dir, publisher)
                    engine.subscribe()
                except BaseException:  # nothing of a failed attempt stays behind: a consumer
                    # left subscribed would take a share of the sessions and never join them
                    handles = [*(engine.consumers if engine else []), publisher.producer]
                    for handle in handles:
                        with contextlib.suppress(pulsar.PulsarException):
                            handle.close()
                    publisher.close()
                    raise
                state.publisher = publisher
                return engine

            try:  # connecting blocks for up to the operation timeout: keep it off the loop
                engine = await loop.run_in_executor(
                    setup, connect_at_start, settings.pulsar, connect, "tracker"
                )
            except pulsar.PulsarException as exc:
                client.close()
                raise RuntimeError(f"cannot reach Pulsar at {settings.pulsar.url}: {exc}") from None
            state.engine = engine
            engine.start()
            log.info(
                "tracker ready: %s + %s -> %s, subscription %s (Key_Shared) as %s",
                settings.pulsar.topics.truth,
                settings.pulsar.topics.centroids,
                run_dir,
                settings.subscription,
                engine.name,
            )
            try:
                yield
            finally:
                await loop.run_in_executor(setup, engine.stop)
                pub = state.publisher
                if pub is not None:
                    await loop.run_in_executor(setup, pub.drain, 10.0)
                    pub.close()
                await loop.run_in_executor(setup, client.close)
                log.info(
                    "errors published: sent %d, acked %d, failed %d, dropped %d",
                    pub.sent if pub else 0,
                    pub.acked if pub else 0,
                    pub.failed if pub else 0,
                    pub.dropped if pub else 0,
                )

    app = FastAPI(title="Carom tracker", lifespan=lifespan)
    app.state.carom = state

    @app.get("/health")
    async def health() -> Response:
        engine, pub = state.engine, state.publisher
        consumers_ok = engine is not None and engine.connected()
        producer_ok = pub is not None and pub.producer.is_connected()
        joining = engine is not None and engine.joining()
        ok = consumers_ok and producer_ok and joining
        broker: dict[str, object] = {
            "state": "up" if consumers_ok and producer_ok else "down",
            "consumers": "connected" if consumers_ok else "disconnected",
            "producer": "connected" if producer_ok else "disconnected",
        }
        if engine is not None and not engine.link.up:
            broker["down_for_s"] = round(engine.link.down_for(), 1)
        body = {
            "status": "ok" if ok else "degraded",
            "broker": broker,
            "join": "running" if joining else "stopped" if engine else "not started",
            "results_queued": pub.queued if pub else 0,
            "run_dir": str(run_dir),
            "rows_written": engine.sink.rows_written if engine else 0,
            "uptime_s": round(time.monotonic() - state.started, 1),
        }
        return health_response(ok, body)

    add_metrics(app, _Metrics(state))
    return app
