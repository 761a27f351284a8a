"""live_client.html in real headless Chromium (Debian's, driven by Playwright) against the real
router, simulator and Pulsar: every decoded frame reported with its RTP timestamp, and the
failure messages a user sees."""

from __future__ import annotations

import asyncio
import csv
import math
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pulsar
import pytest
from playwright.sync_api import Browser, Page

from carom import accounting, schemas
from carom import protocol as p
from carom.signaling import SessionParams
from carom_client.chromium import WEBRTC_STATS_JS
from carom_client.session import CaromSession, RouterInfo
from carom_client.video import VideoClient
from carom_client.webtransport import connect
from carom_local.pulsar import Broker
from carom_runtime.pulsar_io import quiet_logger
from carom_tracker import csvrow
from tests.services import Running, free_port, scrape, service, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class Stack:
    router: Running
    topics: dict[str, str]
    broker: Broker
    csv_dir: Path
    simulator: Running
    tracker: Running


#: A profile of the router's own (its config's ``networks``): 40 ms on the media path.
CUSTOM_NETWORK = "test-dsl"


@pytest.fixture(scope="module")
def stack(pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tag = uuid.uuid4().hex[:8]
    topics = {
        k: f"persistent://public/default/page-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }
    common = ["--pulsar-url", pulsar_broker.service_url]
    common += [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    logs = tmp_path_factory.mktemp("page")
    sim_port, http_port = free_port(), free_port()
    tracker_args = [*common, "--metrics-dir", str(logs / "metrics"), "--run", "page",
                    "--subscription", f"page-{tag}"]  # fmt: skip
    # tests.services gives the simulator its token and the router the same (by env).
    with (
        service("carom_simulator", common, sim_port, logs / "simulator.log") as sim,
        service("carom_tracker", tracker_args, free_port(), logs / "tracker.log") as tracker,
    ):
        # A custom emulated network in the router's YAML, for the page's picker (test_network).
        config = logs / "router.yaml"
        config.write_text(f"networks:\n  {CUSTOM_NETWORK}:\n    media: {{delay_ms: 40}}\n")
        args = [*common, "--simulator-url", sim.url, "--config", str(config),
                "--webtransport-port", str(free_port(socket.SOCK_DGRAM))]  # fmt: skip
        # Healthy (200) only once the broker, the simulator and the tracker are all up.
        with service("carom_router", args, http_port, logs / "router.log") as router:
            yield Stack(router, topics, pulsar_broker, logs / "metrics" / "page", sim, tracker)


def _read(broker: Broker, topic: str, seconds: float) -> list[pulsar.Message]:
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    out: list[pulsar.Message] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                out.append(reader.read_next(300))
            except pulsar.Timeout:
                if out:
                    break
    finally:
        client.close()
    return out


def _carom(page: Page) -> dict[str, object]:
    state: dict[str, object] = page.evaluate(
        "({state: carom.state, error: carom.error, codec: carom.codec, access: carom.access,"
        " sessionId: carom.sessionId, reported: carom.reported, fps: carom.fpsIn,"
        " keys: carom.metadataKeys})"
    )
    return state


def test_page_reports_every_frame_with_its_rtp_timestamp(stack: Stack, browser: Browser) -> None:
    page = browser.new_page(viewport={"width": 1300, "height": 760})
    page.goto(f"{stack.router.url}/?autoconnect=1&fps=30&gravity=980&cor=0.98&vx=400&vy=0")
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    page.wait_for_timeout(10_000)
    state = _carom(page)
    # The page's getStats() figures reach the router's metrics.
    metrics = scrape(stack.router.url)  # fails if the sample is absent
    metrics.get("carom_router_browser_stats", session=str(state["sessionId"]), stat="fps")
    metrics.get("carom_router_browser_stats", session=str(state["sessionId"]), stat="width")
    live = page.evaluate("({results: carom.results, l2: carom.lastL2, lat: carom.lastLatency})")
    shown = page.inner_text("#l2")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live_client.png"))
    page.click("#disconnect")
    page.wait_for_timeout(1000)
    page.close()
    assert state["state"] == "streaming" and state["error"] is None, state
    assert state["codec"] == "H264" and state["access"] == "MediaStreamTrackProcessor", state
    sid = str(state["sessionId"])

    # The centroid topic: the page's reports, and its getStats every 2 s (ClientStats).
    records = [schemas.decode_centroid_topic(m.data())
               for m in _read(stack.broker, stack.topics["centroids"], 20)]  # fmt: skip
    reports = {
        c.rtp_ts: c for c in records if isinstance(c, schemas.Centroid) and c.session_id == sid
    }
    stats = [c for c in records if isinstance(c, schemas.ClientStats) and c.session_id == sid]
    assert len(stats) >= 3, stats  # 10 s of it
    assert stats[-1].frames_received and stats[-1].bytes_received and stats[-1].codec == "H264"
    assert (stats[-1].width, stats[-1].height) == (640, 480)
    truths = [
        t for t in (schemas.decode_truth_topic(m.data())
                    for m in _read(stack.broker, stack.topics["truth"], 20))
        if isinstance(t, schemas.Truth) and t.session_id == sid
    ]  # fmt: skip
    # 10 s at 30 fps is 300 frames; how many the simulator rendered is the machine's (a slow run
    # here rendered 285): half is the bound, the figures are printed below.
    assert len(truths) >= 150, len(truths)
    # Frames rendered while the page was watching: up to the last report the router received.
    last = max(c.t_router_recv_ns for c in reports.values())
    rendered = [t for t in truths if t.t_render_ns <= last - 100_000_000]
    matched = [(t, reports[t.rtp_ts]) for t in rendered if t.rtp_ts in reports]
    l2 = [math.dist((t.x, t.y), (c.x, c.y)) for t, c in matched
          if c.x is not None and c.y is not None]  # fmt: skip
    share = len(matched) / len(rendered)
    mean = sum(l2) / len(l2)
    print(
        f"\npage: {len(rendered)} frames rendered, {share:.2%} reported, mean L2 {mean:.3f} px, "
        f"VideoFrame metadata: {state['keys']}"
    )
    # Every report names its frame exactly (L2 against that frame's truth); the share the page
    # kept up with is the machine's (>= 95% here idle; bench/ measures it).
    assert share >= 0.5 and len(l2) == len(matched) and mean < 0.5
    for t, c in matched:
        assert c.t_browser_recv_ns is not None and c.t_browser_analysed_ns is not None
        assert t.t_render_ns - 5_000_000 <= c.t_browser_recv_ns <= c.t_router_recv_ns + 5_000_000

    # The page showed the live error from the tracker's feed.
    assert live["results"] > 0 and live["l2"] is not None and shown.endswith(" px"), (live, shown)
    # The tracker wrote an L2 row for the frames the page reported, with mean L2 < 0.5 px.
    csv_path = stack.csv_dir / f"{sid}.csv"
    rows: dict[int, dict[str, str]] = {}

    def written() -> bool:
        nonlocal rows
        if csv_path.exists():
            with open(csv_path, newline="") as f:
                rows = {int(r["rtp_ts"]): r for r in csv.DictReader(f)}
        return all(t.rtp_ts in rows for t in rendered[: int(len(rendered) * 0.95)])

    wait_until(
        written,
        lambda: f"a row for 95% of the rendered frames (rows: {len(rows)}/{len(rendered)})",
        timeout=20,
        every=0.5,
    )
    ok = [float(rows[t.rtp_ts]["l2_px"]) for t in rendered
          if t.rtp_ts in rows and rows[t.rtp_ts]["status"] == "ok"]  # fmt: skip
    print(
        f"tracker: {len(ok)}/{len(rendered)} rendered frames with an L2 row, "
        f"mean {sum(ok) / max(1, len(ok)):.3f} px"
    )
    assert len(ok) >= 0.95 * len(matched) and sum(ok) / len(ok) < 0.5


def test_wrong_certificate_hash_is_named(stack: Stack, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(f"{stack.router.url}/?autoconnect=1&cert_hash={'ab' * 32}")
    page.wait_for_function("carom.state === 'error'", timeout=30_000)
    text = page.inner_text("#message")
    page.close()
    assert "certificate hash mismatch" in text


def test_router_down_is_named(browser: Browser) -> None:
    page = browser.new_page()
    page.goto(
        f"file://{ROOT / 'live_client.html'}?autoconnect=1&router=http://127.0.0.1:{free_port()}"
    )
    page.wait_for_function("carom.state === 'error'", timeout=30_000)
    text = page.inner_text("#message")
    page.close()
    assert text.startswith("Router down")


def _csv_coverage(
    stack: Stack, sid: str, frames_due: int
) -> tuple[accounting.Coverage, list[csvrow.Row]]:
    """The session's rows in the tracker's CSV, once it holds ``frames_due`` frames (20 s max)."""
    path = stack.csv_dir / f"{sid}.csv"
    rows: list[csvrow.Row] = []

    def written() -> bool:
        nonlocal rows
        if path.exists():
            with open(path, newline="") as f:
                rows = [csvrow.from_row(r) for r in csv.DictReader(f)]
        return sum(r.status != "orphan" for r in rows) >= frames_due

    wait_until(
        written,
        lambda: f"{frames_due} frames in the tracker's CSV (have {len(rows)} rows)",
        timeout=20,
        every=0.2,
    )
    frames = [(r.frame, r.status) for r in rows if r.frame is not None and r.status != "orphan"]
    return accounting.count(frames, frames_due), rows


def _stream_60fps(
    stack: Stack, browser: Browser, seconds: float, query: str = "", while_streaming: str = "null"
) -> tuple[Any, dict[str, Any]]:
    """One page at 60 fps for ``seconds``, then Disconnect pressed and the drain waited for.

    Returns what ``while_streaming`` (a JS expression) gave before the disconnect, and the page's
    final state. ``view=0``: nothing painted (as headless clients run); what is counted is the same.
    """
    page = browser.new_page()
    page.goto(
        f"{stack.router.url}/?autoconnect=1&fps=60&view=0&gravity=980&cor=0.98&vx=400&vy=0{query}"
    )
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    page.wait_for_timeout(seconds * 1000)
    during = page.evaluate(while_streaming)
    page.click("#disconnect")
    page.wait_for_function("carom.state === 'disconnected' || carom.state === 'error'",
                           timeout=30_000)  # fmt: skip
    got: dict[str, Any] = page.evaluate(
        "({cov: coverage(), end: carom.endComplete, sid: carom.sessionId, err: carom.error,"
        " shown: document.getElementById('coverage').textContent, mode: carom.latencyMode,"
        " modeShown: document.getElementById('mode').textContent})"
    )
    page.close()
    return during, got


def test_page_and_tracker_count_every_frame_due_the_same(stack: Stack, browser: Browser) -> None:
    """Stop pressed: the page drains until the router's end, then its counts equal the CSV's."""
    _, got = _stream_60fps(stack, browser, 6)
    assert got["err"] is None and got["end"] is True, got
    cov = got["cov"]
    shown = accounting.Coverage(
        cov["due"], cov["ok"], cov["not_detected"], cov["missed"], cov["not_sent"]
    )
    assert shown.due >= 6 * 60 * 0.9, shown  # 6 s at 60 fps, every frame index counted
    tracker, rows = _csv_coverage(stack, got["sid"], shown.due)
    print(f"\npage:    {shown.line()}\ntracker: {tracker.line()}")
    assert shown == tracker and cov["no_result"] == tracker.no_row == 0
    assert got["shown"].startswith(f"{shown.ok} / {shown.due} (") and got["shown"].endswith("final")
    # The drain keeps the last frames: the page reports what it decodes after Stop, so the last
    # frames sent are joined, not missed (without the drain, all of them were). How many frames a
    # starved machine's browser drops midway is the machine's (a CI runner: 48 of 301 sent); they
    # are missed on both sides alike, which is what is checked above.
    sent = sorted((r.frame, r.status) for r in rows
                  if r.frame is not None and r.status not in ("orphan", "not_sent"))  # fmt: skip
    tail = [status for _, status in sent[-5:]]
    assert {"ok", "not_detected"} & set(tail), sent[-10:]


def test_frames_a_stalled_simulator_skips_get_not_sent_rows(stack: Stack) -> None:
    """SIGSTOP the simulator mid-stream: the frames due while it was stopped are not sent, and
    each gets its one row, counted the same by the client and the tracker."""
    sid = f"stall-{uuid.uuid4().hex[:8]}"

    async def run() -> CaromSession:
        info = await RouterInfo.fetch(stack.router.url)
        session = CaromSession(info, sid, SessionParams(fps=60))
        await session.open()
        try:
            await asyncio.sleep(2.0)
            stack.simulator.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(0.5)
            finally:
                stack.simulator.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(2.0)
        finally:
            await session.close()
        return session

    # In a thread of its own: this module's sync Playwright owns the main thread's event loop.
    with ThreadPoolExecutor(1) as pool:
        session = pool.submit(asyncio.run, run()).result(timeout=120)
    assert session.end is not None and session.end.complete, session.end
    client = session.coverage()
    assert client is not None
    tracker, rows = _csv_coverage(stack, sid, client.due)
    print(f"\nclient:  {client.line()}\ntracker: {tracker.line()}")
    not_sent = [r for r in rows if r.status == "not_sent"]
    assert len(not_sent) >= 0.5 * 60 * 0.5, len(not_sent)  # most of the 30 frames due in 0.5 s
    assert all(r.reason == "late" and r.truth_x is None and r.t_render_ns for r in not_sent)
    assert tracker.no_row == 0 and tracker.not_sent == len(not_sent)
    assert client == tracker


def test_a_silent_tracker_is_shown_then_its_return(stack: Stack, browser: Browser) -> None:
    """SIGSTOP the tracker: the router notices its silence, the page says so; SIGCONT: back."""
    health = httpx.get(f"{stack.router.url}/health")
    assert health.status_code == 200 and health.json()["tracker"]["state"] == "up", health.text
    page = browser.new_page()
    page.goto(f"{stack.router.url}/?autoconnect=1&fps=30")
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    stack.tracker.proc.send_signal(signal.SIGSTOP)
    try:
        page.wait_for_function(
            "carom.status.tracker && carom.status.tracker.state === 'degraded'", timeout=20_000
        )
        banner = page.inner_text("#status")
        deps = page.inner_text("#deps")
        health = httpx.get(f"{stack.router.url}/health")
    finally:
        stack.tracker.proc.send_signal(signal.SIGCONT)
    page.wait_for_function(
        "carom.status.tracker && carom.status.tracker.state === 'recovered'", timeout=20_000
    )
    after = page.inner_text("#status")
    log = page.evaluate("carom.statusLog.map((s) => [s.state, s.part])")
    page.click("#disconnect")
    page.close()
    assert banner.startswith("tracker degraded: no tracker has been heard from"), banner
    assert deps == "degraded (tracker)"
    assert health.status_code == 503 and health.json()["tracker"]["state"] == "silent"
    assert after.startswith("tracker recovered: tracker "), after
    assert log == [["degraded", "tracker"], ["recovered", "tracker"]]
    assert httpx.get(f"{stack.router.url}/health").status_code == 200


def test_a_video_the_simulator_ends_tells_the_client_why(stack: Stack) -> None:
    """An offer answered but never connected: the simulator ends it ("connect timeout"), the
    tracker passes the reason on, and the router's end carries it to the client."""

    async def run() -> tuple[p.End | None, str]:
        info = await RouterInfo.fetch(stack.router.url)
        wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
        video = VideoClient(lambda _frame: None)
        end: p.End | None = None
        try:
            stream = wt.open_stream()
            stream.write(p.frame(p.Hello(session_id=f"never-{uuid.uuid4().hex[:6]}")))
            stream.write(p.frame(p.Offer(sdp=await video.offer())))  # its answer is never used
            reader = p.FrameReader()
            async with asyncio.timeout(30):
                async for chunk in stream:
                    for body in reader.feed(chunk):
                        msg = p.parse_router(body)
                        if isinstance(msg, p.End):
                            end = msg
                    if end is not None:
                        break
        finally:
            await video.close()
            await wt.close()
        return end, await wt.wait_closed()

    with ThreadPoolExecutor(1) as pool:  # this module's sync Playwright owns the main loop
        end, _closed = pool.submit(asyncio.run, run()).result(timeout=60)
    assert end is not None and end.complete and end.reason == "connect timeout", end


def test_the_page_says_why_its_video_stopped(stack: Stack, browser: Browser) -> None:
    """An end with a reason (the simulator stopped the stream on its own) is shown, not a freeze."""
    page = browser.new_page()
    page.goto(f"{stack.router.url}/?autoconnect=1&fps=30")
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    sid = page.evaluate("carom.sessionId")
    client = pulsar.Client(stack.broker.service_url, logger=quiet_logger())
    try:  # the tracker's word for a stream the simulator ended, as it would send it
        producer = client.create_producer(stack.topics["errors"])
        done = schemas.SessionResults(
            session_id=sid, frames_due=0, t_computed_ns=time.time_ns(), reason="peer failed"
        )
        producer.send(schemas.encode(done), partition_key=sid)
    finally:
        client.close()
    page.wait_for_function("carom.state === 'video stopped'", timeout=20_000)
    page.wait_for_timeout(3_000)  # the page closes the session; nothing overwrites the reason
    shown = page.inner_text("#message")
    got = page.evaluate("({reason: carom.endReason, state: carom.state, end: carom.endComplete})")
    connect_enabled = page.is_enabled("#connect")
    page.close()
    assert got == {"reason": "peer failed", "state": "video stopped", "end": True}, got
    assert shown.startswith("The video stopped: peer failed."), shown
    assert connect_enabled


def test_playout_modes_are_negotiated_and_honoured(stack: Stack, browser: Browser) -> None:
    """Smooth, then interactive (playout-delay min = max = 0), each 10 s at 60 fps in its own page:
    the browser's jitter buffer holds frames in the first and not in the second, every CSV row
    says its mode, and every frame due has its row in both."""
    seen: dict[str, dict[str, Any]] = {}
    for mode in ("smooth", "interactive"):
        stats, got = _stream_60fps(
            stack, browser, 10, f"&latency={mode}", f"({WEBRTC_STATS_JS})(session.pc)"
        )
        rtc: dict[str, Any] = stats
        assert got["err"] is None and got["mode"] == got["modeShown"] == mode, got
        due = got["cov"]["due"]
        assert due >= 10 * 60 * 0.9, got
        cov, rows = _csv_coverage(stack, got["sid"], due)
        joined = cov.ok + cov.not_detected
        print(
            f"\n{mode}: {cov.line()}; jitter buffer {rtc['jitter_buffer_ms']:.2f} ms/frame "
            f"(target {rtc['jitter_buffer_target_ms']:.2f}), processing "
            f"{rtc['processing_ms']:.2f} ms, dropped {rtc['frames_dropped']}, "
            f"freezes {rtc['freeze_count']}; not sent: "
            f"{[r.frame for r in rows if r.status == 'not_sent']}"
        )
        # Every frame due has its row (above); how many were joined is the machine's (>= 99.5%
        # here idle; a slow run here: 343 of 624 not sent by a starved simulator, every frame
        # sent joined). Of the frames sent, half is the bound; bench/e2e.py measures the share.
        assert joined >= 0.5 * (cov.due - cov.not_sent), cov.line()
        assert {r.latency for r in rows if r.status != "orphan"} == {mode}
        seen[mode] = rtc
    smooth, interactive = seen["smooth"], seen["interactive"]

    # Honoured, not just negotiated: smooth holds frames about as long as Chromium's own target,
    # interactive (playout-delay 0) releases them well before it. Measured here idle: smooth
    # 11.4 ms/frame (target 11.8), interactive 0.3 (target 12.4); on a starved CI runner smooth
    # 119 (target 48), interactive 5.3 (target 37). The ratios hold on both; milliseconds do not.
    def held(rtc: dict[str, Any]) -> float:
        return float(rtc["jitter_buffer_ms"])

    assert held(smooth) > 0.5 * float(smooth["jitter_buffer_target_ms"]), smooth
    assert held(interactive) < 0.25 * float(interactive["jitter_buffer_target_ms"]), interactive
    assert held(interactive) < 0.25 * held(smooth), (smooth, interactive)


def test_stop_resume_and_live_settings_from_the_page(stack: Stack, browser: Browser) -> None:
    """Stop, Resume and an input changed while streaming: each is one control, its ack shown;
    a new size reaches the frames the page analyses; a value out of range is refused, named."""
    page = browser.new_page()
    page.goto(f"{stack.router.url}/?autoconnect=1&fps=30&view=0")
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    assert page.evaluate("carom.error") is None
    page.wait_for_function("carom.frameWidth === 640 && carom.reported > 10", timeout=10_000)
    assert page.inner_text("#stream") == "streaming · phase 0"

    def acked(n: int) -> dict[str, Any]:
        page.wait_for_function(f"carom.control.acks.length >= {n}", timeout=20_000)
        ack: dict[str, Any] = page.evaluate(f"carom.control.acks[{n - 1}]")
        return ack

    page.click("#stop")
    ack = acked(1)
    assert ack["ok"] and ack["state"] == "stopped" and ack["phase"] >= 1, ack
    assert page.inner_text("#stream") == f"stopped · phase {ack['phase']}"
    assert page.inner_text("#applied") == f"applied in phase {ack['phase']}"
    page.wait_for_timeout(500)  # frames in flight land; then none while stopped
    reported = page.evaluate("carom.reported")
    page.wait_for_timeout(1000)
    assert page.evaluate("carom.reported") - reported <= 2
    page.click("#resume")
    ack = acked(2)
    assert ack["ok"] and ack["state"] == "streaming", ack
    page.wait_for_function(f"carom.reported > {reported + 10}", timeout=10_000)
    # Changed while streaming: one control 300 ms after the last change, both sides at once (set
    # in one go: filled one by one, a slow machine may let the debounce send two).
    page.evaluate(
        "() => [['width', '320'], ['height', '240']].forEach(([id, v]) => {"
        " const e = document.getElementById(id); e.value = v;"
        " e.dispatchEvent(new Event('input')); })"
    )
    ack = acked(3)
    assert ack["ok"] and ack["params"]["width"] == 320 and ack["params"]["height"] == 240, ack
    assert page.evaluate("carom.control.acks.length") == 3
    page.wait_for_function("carom.frameWidth === 320 && carom.frameHeight === 240", timeout=10_000)
    page.fill("#fps", "500")
    ack = acked(4)
    assert not ack["ok"] and ack["error"].startswith("fps: "), ack
    assert page.inner_text("#applied").startswith("not applied: fps: ")
    page.click("#disconnect")
    page.wait_for_timeout(500)
    page.close()
