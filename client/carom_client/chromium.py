"""Real headless Chromium pages as Carom clients: the page itself, not a Python imitation of it.

Each page opens the router's ``live_client.html`` with ``?autoconnect=1&fps=...``, so it does
exactly what a user's browser does (WebTransport, WebRTC H.264, a centroid and a report per
decoded frame). Unless asked to (``view=True``), it paints nothing (``view=0``: no video
element, no overlay or chart): nobody watches a headless page, and painting in software on the
machine under test cost a fifth of a core per page at 60 fps and most of the latency tail
(render->router p99 159-177 ms painted, 46-49 ms not, one page at 60 fps on 2 cores, two
trials each, before the page redrew its figures at 10 Hz instead of every frame).
Used by ``local/run --clients chromium`` and ``bench/e2e.py --clients chromium``.

It drives Debian's Chromium through Playwright (``executable_path``); it never downloads a
browser. ``local/bootstrap --browser`` installs Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from carom import accounting

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip

# What the page knows (window.carom), read once the run is over and again after disconnecting.
_STATE_JS = """() => {
  const mean = (xs) => xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
  return {state: carom.state, error: carom.error, codec: carom.codec,
          sessionId: carom.sessionId, reported: carom.reported, noDetect: carom.noDetect,
          results: carom.results, missed: carom.missed, fps: carom.fpsIn,
          l2: mean(carom.l2), latency: mean(carom.latency), coverage: coverage(),
          endComplete: carom.endComplete, latencyMode: carom.latencyMode,
          channels: window.caromChannels ? Object.fromEntries(
            Object.entries(caromChannels.types).filter(([, c]) => c.sent || c.skipped || c.failed)
              .map(([t, c]) => [t, {sent: c.sent, bytes: c.bytes, skipped: c.skipped,
                                    failed: c.failed}])) : {}};
}"""
#: A peer connection's video receiver stats (getStats inbound-rtp), per-frame means in ms.
WEBRTC_STATS_JS = """async (pc) => {
  if (!pc) return null;
  const out = {};
  (await pc.getStats()).forEach((s) => {
    if (s.type !== "inbound-rtp" || s.kind !== "video") return;
    const per = (total, n) => (n ? (1000 * total) / n : null);
    Object.assign(out, {
      frames_received: s.framesReceived, frames_decoded: s.framesDecoded,
      frames_dropped: s.framesDropped, packets_lost: s.packetsLost, nack_count: s.nackCount,
      pli_count: s.pliCount, freeze_count: s.freezeCount,
      freezes_ms: 1000 * (s.totalFreezesDuration || 0),
      jitter_buffer_ms: per(s.jitterBufferDelay, s.jitterBufferEmittedCount),
      jitter_buffer_target_ms: per(s.jitterBufferTargetDelay, s.jitterBufferEmittedCount),
      jitter_buffer_minimum_ms: per(s.jitterBufferMinimumDelay, s.jitterBufferEmittedCount),
      decode_ms: per(s.totalDecodeTime, s.framesDecoded),
      processing_ms: per(s.totalProcessingDelay, s.framesDecoded),
      assembly_ms: per(s.totalAssemblyTime, s.framesAssembledFromMultiplePackets),
      decoder: s.decoderImplementation,
      jitter_buffer_delay_s: s.jitterBufferDelay, jitter_buffer_emitted: s.jitterBufferEmittedCount,
      jitter_buffer_target_s: s.jitterBufferTargetDelay,
    });
  });
  return out;
}"""
_PAGE_WEBRTC_JS = (
    f"() => ({WEBRTC_STATS_JS})(typeof session === 'undefined' || !session ? null : session.pc)"
)
_READY_JS = "carom.state === 'streaming' || carom.state === 'error'"
_CLOSED_JS = "carom.state === 'disconnected' || carom.state === 'error'"
_DISCONNECT_JS = (
    "() => { const b = document.getElementById('disconnect'); if (!b.disabled) b.click(); }"
)


class ChromiumError(RuntimeError):
    """Chromium cannot be started; the message is one line a user can act on."""


@dataclass
class PageResult:
    """One page's own figures (window.carom): what it reported and what the tracker sent back."""

    index: int
    session_id: str | None = None
    state: str = "not started"
    error: str | None = None
    codec: str | None = None
    reported: int = 0
    not_detected: int = 0
    results: int = 0
    missed: int = 0
    fps: float | None = None
    live_l2_mean: float | None = None
    live_latency_ms: float | None = None
    #: The page's WebRTC receiver stats at the end of the run (WEBRTC_STATS_JS).
    webrtc: dict[str, object] = field(default_factory=dict)
    #: (epoch ns, WEBRTC_STATS_JS) every ``webrtc_every_s`` while streaming, when asked for.
    webrtc_series: list[tuple[int, dict[str, object]]] = field(default_factory=list)
    #: The page's own coverage (docs/accounting.md), final once the router said ``end``.
    coverage: accounting.Coverage | None = None
    #: The router's ``end``: True when every frame due had its result sent, None if none came.
    end_complete: bool | None = None
    #: The playout mode in force (the answer's ``params.latency``): smooth or interactive, ...
    latency: str | None = None
    #: Typed channels the page sent (``window.caromChannels``): per type sent, bytes, skipped
    #: (never encoded: its stream was behind), failed (numbered, then its stream broke).
    channels: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.reported > 0

    def line(self) -> str:
        name = f"chromium page {self.index} {self.session_id or '-'}"
        if self.error is not None:
            return f"{name}: FAILED ({self.state}): {self.error}"

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None or math.isnan(v) else format(v, fmt)

        return (
            f"{name} [{self.codec or '?'}, latency {self.latency or '?'}]: "
            f"frames reported {self.reported} "
            f"(no ball {self.not_detected}), live results {self.results} (missed {self.missed}), "
            f"live L2 mean {num(self.live_l2_mean, '.3f')} px and render->router "
            f"{num(self.live_latency_ms, '.1f')} ms over the last 100, fps {num(self.fps, '.1f')}"
            + (f"; {self.coverage.line()}" if self.coverage is not None else "")
            + (
                "; channels "
                + ", ".join(
                    f"{t} {c.get('sent', 0)} sent ({c.get('bytes', 0):,} B, skipped "
                    f"{c.get('skipped', 0)}, failed {c.get('failed', 0)})"
                    for t, c in sorted(self.channels.items())
                )
                if self.channels
                else ""
            )
        )

    def update(self, s: Mapping[str, object]) -> None:
        def opt_float(v: object) -> float | None:
            return float(v) if isinstance(v, int | float) else None

        def count(v: object) -> int:
            return int(v) if isinstance(v, int | float) else 0

        self.state = str(s.get("state"))
        err = s.get("error")
        self.error = str(err) if err else None
        self.codec = str(s["codec"]) if s.get("codec") else self.codec
        self.session_id = str(s["sessionId"]) if s.get("sessionId") else self.session_id
        self.reported = count(s.get("reported"))
        self.not_detected = count(s.get("noDetect"))
        self.results = count(s.get("results"))
        self.missed = count(s.get("missed"))
        self.fps = opt_float(s.get("fps")) if s.get("fps") is not None else self.fps
        self.live_l2_mean = opt_float(s.get("l2"))
        self.live_latency_ms = opt_float(s.get("latency"))
        channels = s.get("channels")
        if isinstance(channels, Mapping) and channels:
            self.channels = {
                str(t): {str(k): count(v) for k, v in c.items()}
                for t, c in channels.items()
                if isinstance(c, Mapping)
            }
        cov = s.get("coverage")
        if isinstance(cov, Mapping) and cov.get("due"):
            self.coverage = accounting.Coverage(
                count(cov.get("due")), count(cov.get("ok")), count(cov.get("not_detected")),
                count(cov.get("missed")), count(cov.get("not_sent")),
            )  # fmt: skip
        self.latency = str(s["latencyMode"]) if s.get("latencyMode") else self.latency
        end = s.get("endComplete")
        self.end_complete = bool(end) if end is not None else None


def page_url(router_url: str, params: Mapping[str, object]) -> str:
    """The router's page, set to connect by itself with these session parameters."""
    query = {"autoconnect": "1", **{k: str(v) for k, v in params.items() if v is not None}}
    return f"{router_url.rstrip('/')}/?{urlencode(query)}"


async def run_pages(
    router_url: str,
    sessions: int,
    seconds: float,
    params: Mapping[str, object],
    *,
    executable: str = CHROMIUM,
    connect_timeout_s: float = 30.0,
    on_streaming: asyncio.Event | None = None,
    webrtc_every_s: float | None = None,
    view: bool = False,
    screenshots: Path | None = None,
    extra_flags: Sequence[str] = (),
) -> list[PageResult]:
    """Open ``sessions`` pages in one headless Chromium, stream ``seconds``, disconnect, close.

    ``on_streaming`` is set once every page is streaming (or failed), so a caller can time its
    own measurement window. ``screenshots``: a folder; the pages are painted (``view``) and each
    one's whole page is saved there as ``page-N.png`` at the end of streaming, before the bye, so
    the figures and the chart show the session as it ran. ``extra_flags`` go to Chromium after
    ``FLAGS`` (e.g. ``--ignore-certificate-errors`` for a self-signed HTTPS page in a test). The
    browser is closed on every path, cancellation included.
    """
    view = view or screenshots is not None
    if not Path(executable).exists():
        raise ChromiumError(f"Chromium not found at {executable}: run local/bootstrap --browser")
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import Page, async_playwright

    results = [PageResult(i) for i in range(sessions)]
    url = page_url(router_url, params if view else {**params, "view": 0})

    async def read(page: Page, r: PageResult) -> None:
        with contextlib.suppress(PlaywrightError):
            r.update(await page.evaluate(_STATE_JS))

    async def start(page: Page, r: PageResult) -> None:
        try:
            await page.goto(url, timeout=connect_timeout_s * 1000)
            await page.wait_for_function(_READY_JS, timeout=connect_timeout_s * 1000)
        except PlaywrightError as exc:
            r.error = f"did not start streaming: {str(exc).splitlines()[0]}"
            return
        await read(page, r)

    async def sample(page: Page, r: PageResult) -> None:
        if r.error is None:
            with contextlib.suppress(PlaywrightError):
                r.webrtc_series.append((time.time_ns(), await page.evaluate(_PAGE_WEBRTC_JS) or {}))

    async def finish(page: Page, r: PageResult) -> None:
        if r.error is not None:
            return
        await read(page, r)
        with contextlib.suppress(PlaywrightError):
            r.webrtc = await page.evaluate(_PAGE_WEBRTC_JS) or {}
        if screenshots is not None:
            with contextlib.suppress(PlaywrightError):
                await page.screenshot(path=screenshots / f"page-{r.index}.png", full_page=True)
        end_state, end_error = r.state, r.error
        with contextlib.suppress(PlaywrightError):
            # The page says bye and waits for the router's end (every frame due has its
            # result, docs/accounting.md), 15 s at most.
            await page.evaluate(_DISCONNECT_JS)
            await page.wait_for_function(_CLOSED_JS, timeout=20_000)
        await read(page, r)
        r.state, r.error = end_state, end_error  # as it was while streaming, not after the bye

    async with async_playwright() as pw:
        try:
            browser = await pw.chromium.launch(
                executable_path=executable, headless=True, args=[*FLAGS, *extra_flags]
            )
        except PlaywrightError as exc:
            raise ChromiumError(f"Chromium did not start: {str(exc).splitlines()[0]}") from None
        try:
            pages = [await browser.new_page() for _ in range(sessions)]
            await asyncio.gather(*(start(p, r) for p, r in zip(pages, results, strict=True)))
            if on_streaming is not None:
                on_streaming.set()
            if webrtc_every_s:
                end = time.monotonic() + seconds
                while (left := end - time.monotonic()) > 0:
                    await asyncio.gather(
                        *(sample(p, r) for p, r in zip(pages, results, strict=True))
                    )
                    await asyncio.sleep(min(webrtc_every_s, max(left, 0.0)))
            else:
                await asyncio.sleep(seconds)
            await asyncio.gather(*(finish(p, r) for p, r in zip(pages, results, strict=True)))
        finally:
            with contextlib.suppress(PlaywrightError):
                await browser.close()
    return results
