"""How every Carom service starts: settings from file/env/flags, logging, uvicorn, shutdown.

One place for it, as uvicorn keeps one Config and one Server: a service only names its settings
model and how to build its app. uvicorn owns the signals (SIGINT/SIGTERM stop accepting, run the
app's lifespan shutdown, then exit).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from carom_runtime.config import ConfigError, HttpSettings, add_flags, load

S = TypeVar("S", bound=msgspec.Struct)


def run(
    prog: str,
    description: str,
    model: type[S],
    service: str,
    build_app: Callable[[S], Any],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse flags, load settings, build the ASGI app and serve it until a signal; exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_flags(parser, model)
    args = parser.parse_args(argv)
    try:
        settings = load(model, service, args=args)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    level: str = getattr(settings, "log_level", "info")
    http: HttpSettings = getattr(settings, "http")  # noqa: B009 - every service model has one
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = build_app(settings)
    except (ValueError, OSError) as exc:  # e.g. a bad ICE address, an unreadable certificate
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=http.host,
            port=http.port,
            log_level=level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    return 0 if server.started else 1


def health_response(ok: bool, body: Mapping[str, object]) -> Response:
    """``/health``'s answer: the body as JSON, 200 when ``ok``, else 503.

    Compose healthchecks, k8s probes and the router's watch of the simulator read only the code;
    people and tests read the body, which says which part is not ok.
    """
    return Response(msgspec.json.encode(body), 200 if ok else 503, media_type="application/json")


def add_metrics(app: FastAPI, collector: Collector) -> None:
    """``GET /metrics``: the collector's figures in Prometheus' text format.

    A registry per app, not the library's global one, so several apps in one process (the tests)
    never see each other's figures or collide on names.
    """
    registry = CollectorRegistry()
    registry.register(collector)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
