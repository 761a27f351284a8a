"""``carom-tracker`` / ``python -m carom_tracker``: run the tracker service."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from carom_runtime import service
from carom_tracker.config import SERVICE, TrackerSettings


def _app(settings: TrackerSettings) -> Any:
    from carom_tracker.app import create_app  # heavy imports once the config is known good

    return create_app(settings)


def main(argv: Sequence[str] | None = None) -> int:
    return service.run(
        "carom-tracker",
        "Carom tracker: joins truth and centroid reports per frame, writes CSV rows and errors.",
        TrackerSettings,
        SERVICE,
        _app,
        argv,
    )


def run() -> None:
    sys.exit(main())
