"""Issue 20's Chromium check: a page on an emulated network of 100 ms and 2% loss on its video.

Two headless pages in turn against the real stack, each for a few seconds at 30 fps: one on a
clear loopback, one asking (``?network=`` with a profile's fields, as the page's picker sends a
name) for 100 ms more and 2% of packets lost on the media path, both ways (RTP and RTCP). WebRTC
recovers most losses (NACK, a keyframe on PLI); what is checked is what a user reads in the CSV:
at least 95% of the frames due still have an L2 row, and the 100 ms show in the media hop
(render -> browser) and not in the reports hop (analysed -> router), where nothing was injected.
The bounds on the added latency are wide (timings belong in ``bench/``).
"""

from __future__ import annotations

import statistics
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from playwright.sync_api import Browser

from carom.impairment import PROFILES, Profile
from carom.impairment import Path as NetPath
from tests.page.test_live_client import CUSTOM_NETWORK, Stack, _csv_coverage, stack

__all__ = ["stack"]  # a module-scoped fixture, shared with the page tests

pytestmark = pytest.mark.integration

SECONDS = 8.0
DELAY_MS = 100.0
LOSS_PCT = 2.0


def _run(stack: Stack, browser: Browser, network: str) -> dict[str, Any]:
    """One page streaming ``SECONDS`` at 30 fps, then Disconnect, the drain and its CSV rows."""
    page = browser.new_page()
    query = f"&network={quote(network)}" if network else ""
    page.goto(f"{stack.router.url}/?autoconnect=1&fps=30&view=0{query}")
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    assert page.evaluate("carom.error") is None
    page.wait_for_timeout(SECONDS * 1000)
    page.click("#disconnect")
    page.wait_for_function(
        "carom.state === 'disconnected' || carom.state === 'error'", timeout=30_000
    )
    got: dict[str, Any] = page.evaluate(
        "({cov: coverage(), end: carom.endComplete, sid: carom.sessionId, err: carom.error,"
        " network: carom.network})"
    )
    page.close()
    assert got["err"] is None and got["end"] is True, got
    cov, rows = _csv_coverage(stack, got["sid"], got["cov"]["due"])
    got["coverage"] = cov
    for hop in ("render_to_browser_ms", "analysed_to_router_ms"):
        got[hop] = statistics.median(
            v for r in rows if r.status == "ok" and (v := r.latencies_ms[hop]) is not None
        )
    return got


def test_the_picker_offers_the_routers_profiles(stack: Stack, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(f"{stack.router.url}/?network=satellite")
    page.wait_for_function("document.getElementById('network').options.length > 2")
    names = page.evaluate("[...document.getElementById('network').options].map((o) => o.text)")
    chosen = page.evaluate("document.getElementById('network').value")
    page.close()
    assert sorted(names) == sorted(["none", *PROFILES, CUSTOM_NETWORK]) and chosen == "satellite"


def test_a_profile_of_the_routers_config_goes_by_its_fields_and_is_in_force(
    stack: Stack, browser: Browser
) -> None:
    """``?network=<a name in the router's networks>``: the page sends that profile's fields (the
    contract knows only the built-in names) and the answer names it."""
    page = browser.new_page()
    page.goto(f"{stack.router.url}/?autoconnect=1&fps=30&view=0&network={CUSTOM_NETWORK}")
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    got = page.evaluate(
        "[carom.error, carom.network, document.getElementById('network').value,"
        " [...document.getElementById('network').options].map((o) => o.text)]"
    )
    page.click("#disconnect")
    page.wait_for_function(
        "carom.state === 'disconnected' || carom.state === 'error'", timeout=30_000
    )
    page.close()
    error, network, selected, texts = got
    assert error is None and network == CUSTOM_NETWORK, got
    assert msgspec.json.decode(selected, type=Profile).media.delay_ms == 40, selected
    # Offered once: the placeholder the query made before /config came was replaced.
    assert texts.count(CUSTOM_NETWORK) == 1, texts


def test_100ms_and_2pct_loss_on_the_video_keeps_95pct_and_shows_in_the_media_hop(
    stack: Stack, browser: Browser
) -> None:
    media = NetPath(delay_ms=DELAY_MS, loss_pct=LOSS_PCT)
    custom = Profile(name="video-100ms-2pct", media=media)
    clear = _run(stack, browser, "")
    impaired = _run(stack, browser, msgspec.json.encode(custom).decode())  # its fields
    print(
        f"\nclear:    {clear['coverage'].line()}; media hop {clear['render_to_browser_ms']:.1f} ms,"
        f" reports hop {clear['analysed_to_router_ms']:.1f} ms"
        f"\nimpaired: {impaired['coverage'].line()}; media hop"
        f" {impaired['render_to_browser_ms']:.1f} ms, reports hop"
        f" {impaired['analysed_to_router_ms']:.1f} ms"
    )
    assert clear["network"] is None and impaired["network"] == custom.name
    cov = impaired["coverage"]
    assert cov.due >= SECONDS * 30 * 0.9, cov
    assert cov.ok >= 0.95 * cov.due, cov.line()  # frames due with an L2 row
    added = impaired["render_to_browser_ms"] - clear["render_to_browser_ms"]
    assert DELAY_MS * 0.8 < added < DELAY_MS * 2, (clear, impaired)
    # Nothing injected on the reports path: its hop stays where the clear page's is.
    assert abs(impaired["analysed_to_router_ms"] - clear["analysed_to_router_ms"]) < 20, (
        clear,
        impaired,
    )


def test_the_picker_changes_the_network_live_and_the_new_phase_shows_it(
    stack: Stack, browser: Browser
) -> None:
    """Streaming on a clear loopback, the user picks ``satellite`` (270 ms each way): the router
    acks a new phase on it, and that phase's frames show the delay in the media hop and in the
    reports hop, while the first phase's do not."""
    page = browser.new_page()
    page.goto(f"{stack.router.url}/?autoconnect=1&fps=30&view=0")
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    page.wait_for_timeout(3000)
    page.select_option("#network", "satellite")
    page.wait_for_function(
        "carom.control.phase === 1 || carom.control.error !== null", timeout=20_000
    )
    assert page.evaluate("[carom.control.error, carom.network]") == [None, "satellite"]
    page.wait_for_timeout(5000)
    page.click("#disconnect")
    page.wait_for_function(
        "carom.state === 'disconnected' || carom.state === 'error'", timeout=30_000
    )
    got = page.evaluate("({cov: coverage(), sid: carom.sessionId, err: carom.error})")
    page.close()
    assert got["err"] is None, got
    _, rows = _csv_coverage(stack, got["sid"], got["cov"]["due"])
    hops: dict[int, dict[str, float]] = {}
    for phase in (0, 1):
        ok = [r for r in rows if r.status == "ok" and (r.phase or 0) == phase]
        ok = ok[30:] if phase == 1 else ok  # the first second: frames already on the wire
        assert len(ok) > 30, (phase, len(ok))
        hops[phase] = {
            hop: statistics.median(v for r in ok if (v := r.latencies_ms[hop]) is not None)
            for hop in ("render_to_browser_ms", "analysed_to_router_ms")
        }
    print(f"\nby phase: {hops}")
    delay = PROFILES["satellite"].media.delay_ms
    added = hops[1]["render_to_browser_ms"] - hops[0]["render_to_browser_ms"]
    assert delay * 0.8 < added < delay * 2, hops
    assert hops[0]["analysed_to_router_ms"] < 20, hops
    assert delay * 0.8 < hops[1]["analysed_to_router_ms"] < delay * 2, hops
