"""``carom-router`` / ``python -m carom_router``: run the router service."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn

from carom.config import ConfigError, add_flags, load
from carom_router.config import SERVICE, RouterSettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="carom-router",
        description="Carom router: WebTransport sessions, signaling relay, reports to Pulsar.",
    )
    add_flags(parser, RouterSettings)
    args = parser.parse_args(argv)
    try:
        settings = load(RouterSettings, SERVICE, args=args)
    except ConfigError as exc:
        print(f"carom-router: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from carom_router.app import Router, create_http_app

    try:
        router = Router(settings)
    except (ValueError, OSError) as exc:  # e.g. an unreadable certificate
        print(f"carom-router: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(
        uvicorn.Config(
            create_http_app(router),
            host=settings.http.host,
            port=settings.http.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    return 0 if server.started else 1


def run() -> None:
    sys.exit(main())
