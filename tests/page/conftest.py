"""The page tests' browser: Debian's headless Chromium, launched once per test module.

Chromium's path and flags are ``carom_client.chromium``'s, the ones ``local/run`` and the benches
use. A module that needs more (the fake camera and microphone) names them in ``EXTRA_FLAGS``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from carom_client.chromium import CHROMIUM, FLAGS

#: Chromium's fake camera and microphone, granted without asking (``EXTRA_FLAGS`` of the modules
#: whose pages capture media).
FAKE_MEDIA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: run local/bootstrap --browser", pytrace=False
        )
    extra = list(getattr(request.module, "EXTRA_FLAGS", []))
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*FLAGS, *extra])
        yield b
        b.close()
