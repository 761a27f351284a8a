"""live_client.html's typed channels (carom/channels.py) in real headless Chromium, no router.

- The page's ``encodeChannelFrame`` writes the bytes ``carom.channels.encode_frame`` writes, and
  ``decode_frame`` reads them back, for every format the page sends (video, audio, text, points);
  the same section also runs in Node (the fast lane, no browser).
- With Chromium's fake camera and microphone, the page's capture and WebCodecs encoding, with
  ``?channels=collect`` (the frames go into the page's own arrays instead of WebTransport
  streams): the video chunks decode with PyAV (H.264 Annex B and VP8), one picture per chunk, the
  first a keyframe; the Opus chunks decode to the samples their durations say; every chunk has its
  capture time, its meta, and its seq in order from 0.
- The point-cloud generator: ``12 * count`` bytes, ``count`` in the meta, points on the moving
  torus.
- Chat messages and the router's refusals as the panel shows them.

The router side (streams in, Pulsar out) is tested in tests/router; the whole path in an
end-to-end test.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from playwright.sync_api import Browser, Page

from carom import channels as ch
from carom import protocol as p
from tests.page.channel_router import channel_router
from tests.page.conftest import FAKE_MEDIA
from tests.services import wait_until

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "live_client.html"
EXTRA_FLAGS = FAKE_MEDIA  # the browser fixture (tests/page/conftest.py) adds them
BEGIN = "// ---- channels codec: mirrors carom/channels.py (pinned by tests/page/test_channels_page.py) ----"  # noqa: E501
END = "// ---- end channels codec ----"

# The frames one type collected so far, as base64 (Uint8Array -> string in the page).
COLLECTED_JS = """(type) => (caromChannels.collected[type] || []).map((u8) => {
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
  }
  return btoa(s);
})"""


# --- the page, served over http://127.0.0.1 (a secure context: media devices, WebCodecs) --------


FORMATS: dict[str, ch.Format] = {
    "camera": "video", "screen": "video", "microphone": "audio", "chat": "text", "points": "points"
}  # fmt: skip
#: What ``/config`` answers (the router's, when a test has a stand-in for it).
CONFIG: dict[str, Any] = {}


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/config" and CONFIG:
            self._send(json.dumps(CONFIG).encode(), "application/json")
            return
        if self.path.split("?")[0] not in ("/", "/live_client.html"):
            self.send_error(404)
            return
        self._send(PAGE.read_bytes(), "text/html; charset=utf-8")

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _open(page: Page, base_url: str, query: str) -> None:
    page.goto(f"{base_url}/?{query}")
    page.wait_for_function("window.caromChannels !== undefined", timeout=10_000)


def _wait(page: Page, condition: str, what: str, timeout_ms: int = 20_000) -> None:
    try:
        page.wait_for_function(condition, timeout=timeout_ms)
    except Exception:
        state = page.evaluate("JSON.stringify(caromChannels.types)")
        raise AssertionError(f"{what}: not within {timeout_ms} ms; channels: {state}") from None


def _collected(page: Page, type_: str) -> list[ch.Frame]:
    """Every frame the page wrote on ``type_``'s stream (a write may hold several: the page
    coalesces what is queued), read as the router reads them."""
    raw: list[str] = page.evaluate(COLLECTED_JS, type_)
    reader = ch.ChannelReader()
    frames: list[ch.Frame] = []
    for b in raw:
        reader.push(base64.b64decode(b))
        while (f := reader.next(lambda _t: ch.MAX_MESSAGE_BYTES)) is not None:
            assert isinstance(f, ch.Frame), f
            frames.append(f)
    assert reader.pending == 0, "a write ended inside a frame"
    return frames


def _stats(page: Page, type_: str) -> dict[str, Any]:
    st: dict[str, Any] = page.evaluate(f"({{...caromChannels.types.{type_}}})")
    return st


# --- (1) the frame encoder, against carom/channels.py ---------------------------------------------

VECTORS: list[dict[str, Any]] = [
    {
        "type": "camera",
        "format": "video",
        "seq": 0,
        "t": 1764750000123.25,
        "meta": {
            "codec": "h264",
            "key": True,
            "timestamp_us": 33366,
            "duration_us": 33333,
            "width": 640,
            "height": 480,
        },
        "payload": bytes.fromhex("00000001674200") + bytes(range(256)),
    },
    {
        "type": "microphone",
        "format": "audio",
        "seq": 41,
        "t": 1764750000456.5,
        "meta": {
            "codec": "opus",
            "timestamp_us": 820000,
            "duration_us": 20000,
            "sample_rate": 48000,
            "channels": 1,
        },
        "payload": b"\xfc\xff\xfe" * 40,
    },
    {
        "type": "chat",
        "format": "text",
        "seq": 2**53,
        "t": None,  # NaN: unknown
        "meta": {},
        "payload": "héllo, wörld ✓ 🎱".encode(),
    },
    {
        "type": "points",
        "format": "points",
        "seq": 7,
        "t": 1764750000999.0,
        "meta": {"count": 3},
        "payload": np.array([[0, 1, 2], [-1.5, 2.25, 3e6], [1e-7, -0.0, 42]], "<f4").tobytes(),
    },
]

# Each vector through the page's encodeChannelFrame (hex), or what it threw.
ENCODE_JS = """(vectors) => vectors.map((v) => {
  const hex = (h) => new Uint8Array((h.match(/../g) || []).map((b) => parseInt(b, 16)));
  try {
    const out = encodeChannelFrame(v.type, v.seq, v.t === null ? NaN : v.t, v.meta, hex(v.payload));
    return Array.from(out, (b) => b.toString(16).padStart(2, "0")).join("");
  } catch (e) { return {thrown: e.message}; }
})"""

BAD_VECTORS: list[dict[str, Any]] = [
    {"type": "Camera", "seq": 0, "t": 1.0, "meta": {}, "payload": ""},
    {"type": "camera", "seq": -1, "t": 1.0, "meta": {}, "payload": ""},
    {"type": "camera", "seq": 2**53 + 2, "t": 1.0, "meta": {}, "payload": ""},
    {"type": "camera", "seq": 0, "t": 1.0, "meta": {"x": "a" * 5000}, "payload": ""},
]


def _as_js(vectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**v, "payload": v["payload"].hex() if isinstance(v["payload"], bytes) else v["payload"]}
        for v in vectors
    ]


def _check_encoded(results: list[Any]) -> None:
    good, bad = results[: len(VECTORS)], results[len(VECTORS) :]
    for v, got in zip(VECTORS, good, strict=True):
        assert isinstance(got, str), (v["type"], got)
        data = bytes.fromhex(got)
        t = math.nan if v["t"] is None else v["t"]
        assert data == ch.encode_frame(v["type"], v["seq"], t, v["payload"], v["meta"]), v["type"]
        frame = ch.decode_frame(data)
        assert (frame.type, frame.seq, frame.meta, frame.payload) == (
            v["type"],
            v["seq"],
            v["meta"],
            v["payload"],
        )
        assert math.isnan(frame.t_capture_ms) if v["t"] is None else frame.t_capture_ms == t
        ch.check_format(v["format"], frame)
    for v, got in zip(BAD_VECTORS, bad, strict=True):
        assert isinstance(got, dict) and got.get("thrown"), (v, got)


@pytest.mark.integration
def test_page_frames_equal_python_and_decode(page: Page, base_url: str) -> None:
    _open(page, base_url, "")
    _check_encoded(page.evaluate(ENCODE_JS, _as_js(VECTORS + BAD_VECTORS)))


def test_page_frames_equal_python_in_node() -> None:
    """The same section in Node, with only the JavaScript built-ins (the fast lane's copy)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH (local/bootstrap installs nodejs)", pytrace=False)
    html = PAGE.read_text(encoding="utf-8")
    assert html.count(BEGIN) == 1 and html.count(END) == 1, "one channels codec section"
    section = html[html.index(BEGIN) : html.index(END)]
    script = (
        'const vm = require("vm");\n'
        'const input = JSON.parse(require("fs").readFileSync(0, "utf8"));\n'
        "const ctx = vm.createContext({ TextEncoder });\n"
        'vm.runInContext(`"use strict";\\n${input.section}\\nthis.encodeChannelFrame = '
        "encodeChannelFrame;`, ctx);\n"
        "const encodeChannelFrame = ctx.encodeChannelFrame;\n"
        f"process.stdout.write(JSON.stringify(({ENCODE_JS})(input.vectors)));\n"
    )
    proc = subprocess.run(
        [node, "-e", script],
        input=json.dumps({"section": section, "vectors": _as_js(VECTORS + BAD_VECTORS)}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    _check_encoded(json.loads(proc.stdout))


# --- (2) camera and microphone: capture, WebCodecs, frames ---------------------------------------


def _decode_video(codec: str, chunks: list[bytes]) -> list[av.VideoFrame]:
    ctx = av.CodecContext.create("h264" if codec == "h264" else "vp8", "r")
    frames: list[av.VideoFrame] = []
    for data in chunks:
        frames += ctx.decode(av.Packet(data))
    frames += ctx.decode(None)
    return frames


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_fake_camera_and_microphone_encode_into_valid_frames(
    page: Page, base_url: str, codec: str
) -> None:
    t0 = time.time() * 1000
    _open(page, base_url, f"channels=collect&camera=1&microphone=1&video_codec={codec}")
    _wait(
        page,
        "caromChannels.types.camera.sent >= 45 && caromChannels.types.microphone.sent >= 50",
        "45 video and 50 audio chunks",
    )
    # Stopped as at a bye: tracks ended, encoders flushed, every chunk written.
    page.evaluate("channels.detach(true)")
    t1 = time.time() * 1000
    cam, mic = _stats(page, "camera"), _stats(page, "microphone")
    assert page.evaluate("caromChannels.codecs.camera") == codec
    shown = page.inner_text("#ch-rows")

    video = _collected(page, "camera")
    assert video and cam["encodedFrames"] == cam["sent"] == len(video), (cam, len(video))
    assert cam["lastSeq"] == len(video) - 1 and cam["failed"] == 0 and cam["error"] is None
    assert [f.seq for f in video] == list(range(len(video)))
    for f in video:
        assert f.type == "camera"
        ch.check_format("video", f)
        assert f.meta["codec"] == codec and (f.meta["width"], f.meta["height"]) == (640, 480)
        assert t0 <= f.t_capture_ms <= t1, (t0, f.t_capture_ms, t1)
    assert video[0].meta["key"] is True
    stamps = [f.meta["timestamp_us"] for f in video]
    assert stamps == sorted(set(stamps)), "timestamps strictly increasing"
    # A keyframe at least every ~2 s of media (the first, then by timestamp).
    keys = [f.meta["timestamp_us"] for f in video if f.meta["key"]]
    assert all(b - a <= 2_200_000 for a, b in itertools.pairwise([*keys, stamps[-1]]))
    # Capture times follow the media timestamps (the same clock, read when each frame was).
    span_media = (stamps[-1] - stamps[0]) / 1000
    span_capture = video[-1].t_capture_ms - video[0].t_capture_ms
    assert span_capture > 0 and span_media > 0

    pictures = _decode_video(codec, [f.payload for f in video])
    assert len(pictures) == len(video), (len(pictures), len(video))
    assert {(p.width, p.height) for p in pictures} == {(640, 480)}

    audio = _collected(page, "microphone")
    assert audio and mic["encodedFrames"] == mic["sent"] == len(audio) and mic["failed"] == 0
    assert [f.seq for f in audio] == list(range(len(audio)))
    for f in audio:
        ch.check_format("audio", f)
        assert f.meta["codec"] == "opus" and f.meta["sample_rate"] == 48000, f.meta
        assert f.meta["duration_us"] > 0 and t0 <= f.t_capture_ms <= t1
    rate, channels = audio[0].meta["sample_rate"], audio[0].meta["channels"]
    dec = av.CodecContext.create("opus", "r")
    dec.sample_rate = rate
    dec.layout = "mono" if channels == 1 else "stereo"
    samples = 0
    decoded = 0
    for f in audio:
        packet = av.Packet(f.payload)
        packet.time_base = Fraction(1, 1_000_000)
        for out in dec.decode(packet):
            samples += out.samples
            decoded += 1
    assert decoded == len(audio)
    expected = sum(f.meta["duration_us"] for f in audio) * rate // 1_000_000
    assert abs(samples - expected) <= rate // 50, (samples, expected)  # within one packet
    print(
        f"\n{codec}: {len(video)} video chunks ({sum(f.meta['key'] for f in video)} key, "
        f"{cam['skipped']} skipped), {len(audio)} opus chunks ({mic['skipped']} skipped), "
        f"{channels} ch at {rate} Hz"
    )
    assert "camera" in shown and str(cam["sent"]) in shown


# --- (3) points, chat, the panel ------------------------------------------------------------------


@pytest.mark.integration
def test_point_cloud_generator_sends_count_points(page: Page, base_url: str) -> None:
    _open(page, base_url, "channels=collect&points=1000")
    _wait(page, "caromChannels.types.points.sent >= 3", "3 point clouds")
    page.fill("#ch-points-n", "100000")
    _wait(
        page,
        "(caromChannels.collected.points || []).some((u8) => u8.length > 1200000)",
        "a cloud of 100,000 points",
    )
    page.fill("#ch-points-n", "")  # no number: said, and nothing sent
    _wait(
        page,
        "(caromChannels.types.points.error || '').includes('not a number of points')",
        "the panel saying N is no number",
    )
    page.evaluate("channels.detach(true)")
    frames = _collected(page, "points")
    st = _stats(page, "points")
    assert st["sent"] == st["encodedFrames"] == len(frames) and st["failed"] == 0
    assert [f.seq for f in frames] == list(range(len(frames)))
    counts = [f.meta["count"] for f in frames]
    assert counts[0] == 1000 and counts[-1] == 100_000 and set(counts) == {1000, 100_000}
    for f in frames:
        ch.check_format("points", f)
        assert len(f.payload) == ch.POINT_BYTES * f.meta["count"]
        xyz = np.frombuffer(f.payload, "<f4").reshape(-1, 3)
        assert np.isfinite(xyz).all()
        # On the torus: ring radius 1, tube radius 0.25-0.45, whatever the rotation.
        r = np.linalg.norm(xyz, axis=1)
        assert r.min() >= 1 - 0.46 and r.max() <= 1 + 0.46, (r.min(), r.max())
    same_n = [(a, b) for a, b in itertools.pairwise(frames) if a.meta == b.meta]
    assert same_n and all(a.payload != b.payload for a, b in same_n), "the cloud moves"


@pytest.mark.integration
def test_chat_messages_one_frame_each(page: Page, base_url: str) -> None:
    _open(page, base_url, "channels=collect&chat=h%C3%A9llo&chat=%E2%9C%93%20two")
    page.fill("#ch-chat", "typed 🎱")
    page.click("#ch-send")
    page.fill("#ch-chat", "by Enter")
    page.press("#ch-chat", "Enter")
    _wait(page, "caromChannels.types.chat.sent === 4", "4 chat messages")
    frames = _collected(page, "chat")
    assert [(f.seq, f.payload.decode()) for f in frames] == [
        (0, "héllo"),
        (1, "✓ two"),
        (2, "typed 🎱"),
        (3, "by Enter"),
    ]
    for f in frames:
        ch.check_format("text", f)
        assert f.meta == {} and not math.isnan(f.t_capture_ms)
    assert page.input_value("#ch-chat") == ""


@pytest.mark.integration
def test_router_refusals_show_in_the_panel_by_type(page: Page, base_url: str) -> None:
    _open(page, base_url, "")
    # As the router's control stream delivers them (Session.onControl), with no session at all.
    page.evaluate(
        """() => {
      const s = Object.create(Session.prototype);
      s.onControl({type: "error", code: "over_limit",
                   message: "camera message of 3000000 bytes (max 2097152)"});
      s.onControl({type: "error", code: "rate", message: "chat: over 20 messages/s"});
    }"""
    )
    rows = page.eval_on_selector_all(
        "#ch-rows tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    by_type = {r[0]: r for r in rows}
    assert "over_limit" in by_type["camera"][5] and "3000000 bytes" in by_type["camera"][5]
    assert "rate" in by_type["chat"][5] and by_type["points"][5] == ""
    errors = page.evaluate("caromChannels.errors.map((e) => [e.code, e.type])")
    assert errors == [["over_limit", "camera"], ["rate", "chat"]]
    # Not the page's banner: that stays for the session's own errors.
    assert page.inner_text("#message") == ""
    # Before a session, chat says why it did not go.
    page.fill("#ch-chat", "too early")
    page.click("#ch-send")
    assert "session is up" in page.evaluate("caromChannels.types.chat.error")
    assert page.input_value("#ch-chat") == "too early"


@pytest.mark.integration
def test_screen_share_sends_or_says_why(page: Page, base_url: str) -> None:
    _open(page, base_url, "channels=collect")
    page.check("#ch-screen")
    _wait(
        page,
        "caromChannels.types.screen.sent > 0 || caromChannels.types.screen.error !== null",
        "screen chunks or the reason there are none",
    )
    st = _stats(page, "screen")
    if st["error"] is not None:  # headless may have no screen to give: the panel says why
        assert st["state"] == "off" and not page.is_checked("#ch-screen")
        assert st["error"] in page.inner_text("#ch-rows")
        print(f"\nscreen: {st['error']}")
    else:
        page.evaluate("channels.detach(true)")
        frames = _collected(page, "screen")
        assert frames[0].meta["key"] is True
        for f in frames:
            ch.check_format("video", f)
        print(f"\nscreen: {len(frames)} chunks {frames[0].meta}")


# --- on a real WebTransport session --------------------------------------------------------------


@pytest.mark.integration
def test_each_type_on_its_own_stream_all_finished_before_the_bye(page: Page, base_url: str) -> None:
    """The page against a stand-in for the router (tests/page/channel_router.py): after the
    welcome each type on one unidirectional stream, seq from 0, what the page counts as sent is
    what arrived; a refusal from the router shows by its type; at Disconnect the encoders are
    flushed and every stream finished before the bye."""
    with channel_router() as router:
        CONFIG.update(router.config)
        try:
            _open(
                page,
                base_url,
                "autoconnect=1&view=0&camera=1&microphone=1&points=2000&chat=first&video_codec=vp8",
            )
            _wait(
                page,
                "caromChannels.attached && caromChannels.types.camera.sent >= 30 && "
                "caromChannels.types.microphone.sent >= 50 && "
                "caromChannels.types.points.sent >= 3 && caromChannels.types.chat.sent === 1",
                "every type flowing on the session",
            )
            (s,) = router.sessions
            assert s.hello is not None and s.hello.session_id == page.evaluate("carom.sessionId")
            message = "points message of 24010 bytes (max 16000)"
            router.send_control(s, p.Error(code="over_limit", message=message))
            _wait(
                page,
                "(caromChannels.types.points.error || '').includes('over_limit')",
                "the refusal in the panel",
            )
            assert message in page.inner_text("#ch-rows")
            page.click("#disconnect")
            wait_until(lambda: any(e.what == "bye" for e in s.events), "the bye", timeout=20)
            page.wait_for_function("caromChannels.attached === false", timeout=10_000)
            stats = page.evaluate("JSON.parse(JSON.stringify(caromChannels.types))")
        finally:
            CONFIG.clear()
    assert not s.errors, s.errors
    bye = next(i for i, e in enumerate(s.events) if e.what == "bye")
    assert all(e.what != "frame" for e in s.events[bye:]), "a frame after the bye"
    finished = {e.stream_id for e in s.events[:bye] if e.what == "fin"}
    by_stream: dict[int, list[ch.Frame]] = {}
    for e in s.events:
        if e.frame is not None and e.stream_id is not None:
            by_stream.setdefault(e.stream_id, []).append(e.frame)
    assert finished == set(by_stream), "every channel stream finished before the bye"
    types = {sid: {f.type for f in frames} for sid, frames in by_stream.items()}
    assert sorted(t for ts in types.values() for t in ts) == [
        "camera",
        "chat",
        "microphone",
        "points",
    ], types  # one stream per type, one type per stream
    print("\n" + ", ".join(f"{f[0].type}: {len(f)}" for f in by_stream.values()))
    for frames in by_stream.values():
        type_ = frames[0].type
        st = stats[type_]
        assert [f.seq for f in frames] == list(range(len(frames))), type_
        assert st["sent"] == st["encodedFrames"] == len(frames) and st["failed"] == 0, (type_, st)
        assert st["bytes"] == sum(
            len(ch.encode_frame(f.type, f.seq, f.t_capture_ms, f.payload, f.meta)) for f in frames
        )
        for f in frames:
            ch.check_format(FORMATS[type_], f)
        if type_ == "camera":
            assert frames[0].meta["key"] is True
            assert len(_decode_video("vp8", [f.payload for f in frames])) == len(frames)
