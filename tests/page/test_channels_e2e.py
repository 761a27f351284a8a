"""Typed channels end to end: live_client.html in real headless Chromium with its fake camera and
microphone, sending camera (WebCodecs), microphone (Opus), chat and a point cloud for 30 s beside
the ball's video, through the real router to real Pulsar, recorded by the real recorder.

What it shows (issue 18's first "done when"): every chunk the page sent is on its type's topic
exactly once (sequence numbers checked, the router's ``ChannelEnd`` agreeing), the recorded video
decodes to as many frames as the page encoded, and the recorder's report gives each type's latency
capture -> router -> published -> consumed.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulsar
import pytest
import yaml
from playwright.sync_api import Browser

from carom import channels as ch
from carom_local.pulsar import Broker
from carom_recorder import report as recorder_report
from carom_runtime import media
from carom_runtime.pulsar_io import quiet_logger
from tests.page.conftest import FAKE_MEDIA
from tests.services import Running, free_port, service, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXTRA_FLAGS = FAKE_MEDIA  # the browser fixture (tests/page/conftest.py) adds them
SECONDS = 30
POINTS = 10_000
TYPES = ("camera", "microphone", "chat", "points")
CHAT = [f"message {i}: héllo ✓" for i in range(12)]


@dataclass
class Stack:
    router: Running
    recorder: Running
    routes: ch.Routes
    recordings: Path
    broker: Broker


@pytest.fixture(scope="module")
def stack(pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tag = uuid.uuid4().hex[:8]
    logs = tmp_path_factory.mktemp("channels")
    topics = {
        k: f"persistent://public/default/chpage-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }
    common = ["--pulsar-url", pulsar_broker.service_url]
    common += [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    # The shipped routes, each on a private topic.
    tree = yaml.safe_load((ROOT / "router" / "routes.yaml").read_text())
    for name, route in tree["routes"].items():
        route["topic"] = f"persistent://public/default/chpage-{name}-{tag}"
    routes_file = logs / "routes.yaml"
    routes_file.write_text(yaml.safe_dump(tree))
    routes = ch.parse_routes(tree)
    recordings = logs / "recordings"
    tracker_args = [*common, "--metrics-dir", str(logs / "metrics"), "--run", "chpage",
                    "--subscription", f"chpage-{tag}"]  # fmt: skip
    recorder_args = [*common, "--routes-file", str(routes_file), "--out-dir", str(recordings),
                     "--subscription", f"chpage-{tag}"]  # fmt: skip
    with (
        service("carom_simulator", common, free_port(), logs / "simulator.log") as sim,
        service("carom_tracker", tracker_args, free_port(), logs / "tracker.log"),
        service("carom_recorder", recorder_args, free_port(), logs / "recorder.log") as recorder,
    ):
        args = [*common, "--simulator-url", sim.url,
                "--webtransport-port", str(free_port(socket.SOCK_DGRAM)),
                "--channels-routes-file", str(routes_file),
                "--channels-metrics-csv", str(logs / "router-channels.csv")]  # fmt: skip
        with service("carom_router", args, free_port(), logs / "router.log") as router:
            yield Stack(router, recorder, routes, recordings, pulsar_broker)


def _topic(broker: Broker, topic: str, sid: str) -> tuple[list[ch.ChannelMessage], ch.ChannelEnd]:
    """The session's records on ``topic``, from its start, up to its ``ChannelEnd`` (30 s max)."""
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    messages: list[ch.ChannelMessage] = []
    end: ch.ChannelEnd | None = None
    deadline = time.monotonic() + 30
    try:
        while end is None and time.monotonic() < deadline:
            try:
                record = ch.decode_record(reader.read_next(500).data())
            except pulsar.Timeout:
                continue
            if record.session_id != sid:
                continue
            if isinstance(record, ch.ChannelEnd):
                end = record
            else:
                messages.append(record)
    finally:
        client.close()
    assert end is not None, f"no ChannelEnd on {topic} for {sid} ({len(messages)} messages)"
    return messages, end


def test_camera_microphone_chat_and_points_for_30_s_each_chunk_once_recorded_and_timed(
    stack: Stack, browser: Browser
) -> None:
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(
        f"{stack.router.url}/?autoconnect=1&fps=30&camera=1&microphone=1&points={POINTS}"
        "&video_codec=h264"
    )
    page.wait_for_function("carom.state === 'streaming' || carom.state === 'error'", timeout=30_000)
    sid = str(page.evaluate("carom.sessionId"))
    page.wait_for_function(
        "['camera', 'microphone', 'points'].every(t => caromChannels.types[t].sent > 0)",
        timeout=20_000,
    )
    t0 = time.monotonic()
    for i, text in enumerate(CHAT):  # typed into the chat box, spread over the run
        page.wait_for_timeout(
            max(0.0, (i + 1) * SECONDS / (len(CHAT) + 1) - (time.monotonic() - t0)) * 1000
        )
        page.fill("#ch-chat", text)
        page.press("#ch-chat", "Enter")
    page.wait_for_timeout(max(0.0, SECONDS - (time.monotonic() - t0)) * 1000)
    during: str = page.evaluate("carom.state")
    page.click("#disconnect")
    page.wait_for_function(
        "['camera','microphone','chat','points'].every(t => caromChannels.types[t].state === 'off')"
        " && carom.state !== 'streaming'",
        timeout=30_000,
    )
    sent: dict[str, Any] = page.evaluate("caromChannels")
    page.close()
    assert during == "streaming", during  # the ball's video ran beside the channels
    types = sent["types"]
    print(f"\npage {sid}: codec {sent['videoCodec']}; " + "; ".join(
        f"{t} sent {types[t]['sent']} ({types[t]['bytes']} B, skipped {types[t]['skipped']}, "
        f"failed {types[t]['failed']})" for t in TYPES
    ))  # fmt: skip
    assert sent["videoCodec"] == "h264", sent["codecs"]
    for t in TYPES:
        assert types[t]["failed"] == 0 and types[t]["error"] is None, (t, types[t])
    # 30 s of each: the fake camera gives ~20-30 fps, Opus 50 chunks/s, points 4 Hz.
    assert types["camera"]["sent"] >= 10 * SECONDS * 0.5, types["camera"]
    assert types["microphone"]["sent"] >= 25 * SECONDS * 0.5, types["microphone"]
    assert types["points"]["sent"] >= 4 * SECONDS * 0.5, types["points"]
    assert types["chat"]["sent"] == len(CHAT), types["chat"]

    # On Pulsar: every seq the page sent, exactly once, on its own type's topic; the router's end.
    topics = {t: stack.routes.routes[t].topic for t in TYPES}
    on_topic: dict[str, list[ch.ChannelMessage]] = {}
    for t in TYPES:
        messages, end = _topic(stack.broker, topics[t], sid)
        seqs = Counter(m.seq for m in messages)
        n = types[t]["sent"]
        assert sorted(seqs) == list(range(n)), (t, n, sorted(set(range(n)) - set(seqs))[:20])
        assert max(seqs.values()) == 1, (t, [s for s, k in seqs.items() if k > 1][:20])
        assert (end.accepted, end.last_seq, end.refused, end.failed_seqs) == (n, n - 1, 0, []), end
        assert all(m.type == t and m.t_capture_ns is not None for m in messages)
        on_topic[t] = messages
    texts = [m.payload.decode() for m in sorted(on_topic["chat"], key=lambda m: m.seq)]
    assert texts == CHAT
    assert all(m.meta["count"] == POINTS and len(m.payload) == 12 * POINTS
               for m in on_topic["points"])  # fmt: skip
    assert (
        on_topic["camera"][0].meta["key"] is True and on_topic["camera"][0].meta["codec"] == "h264"
    )

    # The recorder: every type's summary says exactly once; the video and audio files decode.
    folder = stack.recordings / sid

    def summaries() -> dict[str, dict[str, Any]] | None:
        found = {t: folder / f"{t}.summary.json" for t in TYPES}
        if not all(p.exists() for p in found.values()):
            return None
        return {t: json.loads(p.read_text()) for t, p in found.items()}

    done = wait_until(summaries, f"a summary per type in {folder}", timeout=30, every=0.5)
    for t in TYPES:
        s = done[t]
        assert s["exactly_once"] is True and s["received"] == types[t]["sent"], (t, s)
        assert s["duplicates_dropped"] == 0 and s["missing"] == 0, (t, s)
    files = {p.suffix: p for p in folder.glob("camera.*")}
    video = next(p for p in folder.glob("camera.*") if p.suffix in (".mkv", ".mp4", ".webm"))
    frames = media.count_frames(video, "video")
    print(f"recorded {video.name}: {frames} frames decoded; files {sorted(files)}")
    assert frames == types["camera"]["encodedFrames"] == types["camera"]["sent"]
    audio = next(p for p in folder.glob("microphone.*") if p.suffix in (".ogg", ".webm", ".mka"))
    assert media.count_frames(audio, "audio") == types["microphone"]["sent"]

    # The report: each type's latency, capture -> router -> published -> consumed.
    text = recorder_report.report(stack.recordings)
    print(text)
    for t in TYPES:
        line = next(x for x in text.splitlines() if x.strip().startswith(t))
        assert line.count("/") >= 4 and " - " not in line, line
