"""``carom-simulator`` / ``python -m carom_simulator``: run the simulator service."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from carom_runtime import service
from carom_simulator.config import SERVICE, SimulatorSettings


def _app(settings: SimulatorSettings) -> Any:
    from carom_simulator.app import create_app  # heavy imports once the config is known good

    return create_app(settings)


def main(argv: Sequence[str] | None = None) -> int:
    return service.run(
        "carom-simulator",
        "Carom simulator: bouncing-ball H.264 video over WebRTC, truth to Pulsar.",
        SimulatorSettings,
        SERVICE,
        _app,
        argv,
    )


def run() -> None:
    sys.exit(main())
