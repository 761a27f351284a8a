"""How every Carom service starts: settings from file/env/flags, logging, uvicorn, shutdown.

One place for it, as uvicorn keeps one Config and one Server: a service only names its settings
model and how to build its app. uvicorn owns the signals (SIGINT/SIGTERM stop accepting, run the
app's lifespan shutdown, then exit).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec
import uvicorn

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
