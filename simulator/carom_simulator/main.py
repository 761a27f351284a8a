"""``carom-simulator`` / ``python -m carom_simulator``: run the simulator service."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn

from carom.config import ConfigError, add_flags, load
from carom_simulator.config import SERVICE, SimulatorSettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="carom-simulator",
        description="Carom simulator: bouncing-ball H.264 video over WebRTC, truth to Pulsar.",
    )
    add_flags(parser, SimulatorSettings)
    args = parser.parse_args(argv)
    try:
        settings = load(SimulatorSettings, SERVICE, args=args)
    except ConfigError as exc:
        print(f"carom-simulator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from carom_simulator.app import create_app  # heavy imports after the config is known good

    try:
        app = create_app(settings)
    except ValueError as exc:  # e.g. a bad ICE host address
        print(f"carom-simulator: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.http.host,
        port=settings.http.port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def run() -> None:
    sys.exit(main())
