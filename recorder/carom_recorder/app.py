"""The recorder's HTTP shell: health and Prometheus metrics around the receive-and-write engine.

The routes file is read once at start (a bad one stops the start, exit 2, with the reason); the
engine is built in the lifespan and stopped there: no more receiving, what is written is
durable and acked, the rest stays unacked for the next run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pulsar
import yaml
from fastapi import FastAPI, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carom.channels import ChannelError, Routes, parse_routes
from carom_recorder.config import RecorderSettings
from carom_recorder.engine import Recorder
from carom_runtime.pulsar_io import make_client
from carom_runtime.service import add_metrics, health_response

log = logging.getLogger("carom.recorder")

#: TypeCounters field -> (metric, outcome label); the gauges apart.
_MESSAGES = ("received", "written", "duplicates", "redelivered", "invalid", "ends")
_SESSIONS = ("finalized", "finalized_idle", "exactly_once", "not_exactly_once")
_ERRORS = ("media_errors", "write_errors")


def load_routes(path: str) -> Routes:
    """The routes file, parsed and checked; ``ValueError`` naming the file and the key."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read routes file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"routes file {path} is not valid YAML: {exc}") from None
    try:
        return parse_routes(tree, path)
    except ChannelError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class State:
    settings: RecorderSettings
    routes: Routes
    out_dir: Path
    recorder: Recorder | None = None
    started: float = field(default_factory=time.monotonic)


class _Metrics(Collector):
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        rec = self.state.recorder
        if rec is None:
            return
        m = CounterMetricFamily(
            "carom_recorder_messages", "Channel messages by outcome", labels=["type", "outcome"]
        )
        s = CounterMetricFamily(
            "carom_recorder_sessions", "Session types finalized", labels=["type", "outcome"]
        )
        e = CounterMetricFamily("carom_recorder_errors", "Write failures", labels=["type", "what"])
        b = CounterMetricFamily("carom_recorder_bytes", "Payload bytes written", labels=["type"])
        g = GaugeMetricFamily("carom_recorder_open", "Session types open", labels=["type"])
        for type_, c in sorted(rec.counters.items()):
            for name in _MESSAGES:
                m.add_metric([type_, name], getattr(c, name))
            for name in _SESSIONS:
                s.add_metric([type_, name], getattr(c, name))
            for name in _ERRORS:
                e.add_metric([type_, name.removesuffix("_errors")], getattr(c, name))
            b.add_metric([type_], c.bytes)
            g.add_metric([type_], c.open_sessions)
        yield from (m, s, e, b, g)
        yield CounterMetricFamily(
            "carom_recorder_broker_outages", "Times the Pulsar link was lost",
            value=rec.link.outages,
        )  # fmt: skip


def create_app(settings: RecorderSettings) -> FastAPI:
    routes = load_routes(settings.routes_file)
    if not routes.routes:
        raise ValueError(f"routes file {settings.routes_file} has no routes: nothing to record")
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # fail at start (exit 2) if it cannot be made
    state = State(settings, routes, out_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="carom-pulsar-setup") as setup:
            client = make_client(settings.pulsar)
            recorder = Recorder(settings, routes, client, out_dir)
            try:  # subscribing blocks for up to the operation timeout: keep it off the loop
                await loop.run_in_executor(setup, recorder.subscribe)
            except pulsar.PulsarException as exc:
                client.close()
                raise RuntimeError(f"cannot reach Pulsar at {settings.pulsar.url}: {exc}") from None
            state.recorder = recorder
            recorder.start()
            log.info(
                "recorder ready: %d topics (%s) -> %s, subscription %s (Key_Shared) as %s",
                len(routes.routes),
                ", ".join(recorder.types),
                out_dir,
                settings.subscription,
                recorder.name,
            )
            try:
                yield
            finally:
                await loop.run_in_executor(setup, recorder.stop)
                await loop.run_in_executor(setup, client.close)
                written = sum(c.written for c in recorder.counters.values())
                dups = sum(c.duplicates for c in recorder.counters.values())
                log.info("recorder stopped: %d messages written, %d duplicates dropped",
                         written, dups)  # fmt: skip

    app = FastAPI(title="Carom recorder", lifespan=lifespan)
    app.state.carom = state

    @app.get("/health")
    async def health() -> Response:
        rec = state.recorder
        connected = rec is not None and rec.connected()
        running = rec is not None and rec.running()
        ok = connected and running
        body = {
            "status": "ok" if ok else "degraded",
            "broker": "up" if connected else "down",
            "receivers": "running" if running else "stopped" if rec else "not started",
            "types": rec.types if rec else [],
            "out_dir": str(out_dir),
            "written": sum(c.written for c in rec.counters.values()) if rec else 0,
            "uptime_s": round(time.monotonic() - state.started, 1),
        }
        return health_response(ok, body)

    add_metrics(app, _Metrics(state))
    return app
