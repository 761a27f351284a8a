"""The shipped YAML files are exactly the models' defaults (so docs, files and code agree)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from carom_recorder.config import RecorderSettings
from carom_router.config import RouterSettings
from carom_runtime import config
from carom_simulator.config import SimulatorSettings
from carom_tracker.config import TrackerSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("model", "service", "path"),
    [
        (SimulatorSettings, "simulator", ROOT / "simulator" / "simulator.yaml"),
        (RouterSettings, "router", ROOT / "router" / "router.yaml"),
        (TrackerSettings, "tracker", ROOT / "tracker-service" / "tracker.yaml"),
        (RecorderSettings, "recorder", ROOT / "recorder" / "recorder.yaml"),
    ],
)
def test_shipped_yaml_matches_defaults(
    model: type[msgspec.Struct], service: str, path: Path
) -> None:
    assert config.load(model, service, path, env={}) == model()
