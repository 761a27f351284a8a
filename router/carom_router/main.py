"""``carom-router`` / ``python -m carom_router``: run the router service."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from carom_router.config import SERVICE, RouterSettings
from carom_runtime import service


def _app(settings: RouterSettings) -> Any:
    from carom_router.app import create_http_app
    from carom_router.router import Router

    return create_http_app(Router(settings))


def main(argv: Sequence[str] | None = None) -> int:
    return service.run(
        "carom-router",
        "Carom router: WebTransport sessions, signaling relay, reports to Pulsar.",
        RouterSettings,
        SERVICE,
        _app,
        argv,
    )


def run() -> None:
    sys.exit(main())
