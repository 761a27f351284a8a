"""The floor inside the project: a bare aiortc -> Chromium path, then Carom, in the same run.

Usage::

    .venv/bin/python bench/floor.py [--fps 30,60] [--duration 20] [--results-dir bench/results]

For every fps, two measurements one after the other, each with one headless Chromium page:

1. *Bare*: this process serves the ball (same physics, size, renderer and H.264 encoder settings
   as the simulator) to a page over plain aiortc, paced on its own clock, rendered on the loop,
   no executor, no broker, no router. The page runs ``findBall`` copied at run time out of
   ``live_client.html`` (the very same centroid code) on every ``MediaStreamTrackProcessor``
   frame and sends the same 36-byte report back over a WebRTC DataChannel (unordered, no
   retransmissions, like a datagram). *render->report* = frame handed to the encoder -> report
   received by this process: the bare equivalent of Carom's render->router.
2. *Carom*: the full stack (simulator, router, tracker, Pulsar), ``live_client.html`` in one page,
   as ``bench/e2e.py --clients chromium`` runs it, read back from the tracker's CSV.

3. *Interactive mode* (issue 22): the same two again with the playout-delay RTP header extension
   at min = max = 0 (``--interactive``, default ``interactive``; ``none`` skips it): Carom with
   ``latency=interactive`` and the bare path answering and writing the extension itself, beside
   the stock bare floor (goal: Carom interactive render->router p50 <= 0.6 x bare p50 and
   p99 <= 0.7 x bare p99), with the page's jitter-buffer delay in each mode.
4. *Pulsar hop*: on the same broker, right after Carom, a bare Pulsar send -> receive at the
   same message rate (plain producer, no batching; one Exclusive and one Key_Shared consumer,
   ``bench/tracker_throughput.py``'s ``bare_paced``) beside Carom's own report published -> L2
   computed from the CSV (goal: p50 <= 2 ms, p99 <= 8 ms).

It prints Carom's figures as ratios to the bare path's (render->router p50/p99, render->computed
p99) with the issue-13 goals (render->router p99 <= 1.5 x bare p99; render->computed p99 <= that
bound + 8 ms; >= 99.9 % of frames due with an L2 row), each hop's p50/p99, the worst seconds of
each run hop by hop, the simulator's pacing counters and the page's WebRTC receiver stats
(jitter buffer, decode, drops). Results: ``<results-dir>/floor.json`` and ``floor.md``.
Everything it starts is stopped at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import signal
import struct
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import e2e  # noqa: E402
from carom_simulator.physics import Ball, PhysicsParams  # noqa: E402
from carom_simulator.render import Renderer  # noqa: E402
from carom_simulator.track import _video_frame  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "live_client.html"
GOAL_P99_RATIO = 1.5
GOAL_COMPUTED_SLACK_MS = 8.0
GOAL_KEPT = 0.999
GOAL_HOP_P50_MS = 2.0
GOAL_HOP_P99_MS = 8.0
GOAL_INTERACTIVE_P50 = 0.6  # Carom interactive render->router p50 / bare (stock) p50
GOAL_INTERACTIVE_P99 = 0.7
#: Frames rendered this long after a path's first are its steady state. Before: the session's
#: start-up (aiortc's encoder cold start, Chromium's first decodes and first jitter estimate,
#: every process's first frames), measured on an Intel Xeon 2-vCPU VM: 16 of the 18 Carom
#: interactive frames over 20 ms at 60 fps fell in the first 3 s (p99 32.8 ms from the first
#: frame, 13.9 ms after 3 s).
STEADY_AFTER_S = 3.0
PULSAR_BARE_S = 10.0  # seconds of each bare Pulsar measurement
SAMPLE_S = 0.25  # getStats every so often while measuring: the jitter buffer over time
REPORT = struct.Struct(">BBHIIffdd")  # the page's 36-byte report (docs/protocol.md)
RTP_MOD = 2**32
RTP_CLOCK = 90_000
HOPS = ("render_to_browser_ms", "browser_decode_to_analysed_ms", "analysed_to_router_ms",
        "published_to_tracker_ms", "tracker_to_computed_ms", "end_to_end_ms",
        "render_to_computed_ms")  # fmt: skip
SIMULATOR_COUNTERS = ("frames_sent", "frames_late_dropped", "generation_late",
                      "release_lag_ms_max", "frames_unsent", "truth_overflow")  # fmt: skip
BARE_HOPS = ("render_to_browser_ms", "browser_decode_to_analysed_ms", "analysed_to_server_ms",
             "render_to_server_ms")  # fmt: skip


# --- pure arithmetic (tests/bench/test_floor.py) ------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as the tracker's report), None when empty."""
    return float(np.percentile(values, q)) if len(values) else None


def p50_p99(values: Sequence[float]) -> dict[str, float | int | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}


def steady(
    timeline: Sequence[tuple[int, Mapping[str, float]]],
    key: str,
    after_s: float = STEADY_AFTER_S,
) -> dict[str, float | int | None]:
    """p50/p99 of ``key`` over the frames rendered ``after_s`` or more after the first one."""
    have = [(t, hops[key]) for t, hops in timeline if key in hops]
    if not have:
        return p50_p99([])
    t0 = min(t for t, _ in have)
    return p50_p99([v for t, v in have if t - t0 >= after_s * 1e9])


def ratio(carom: float | None, bare: float | None) -> float | None:
    """carom / bare, None when either is missing or the bare figure is not positive."""
    if carom is None or bare is None or bare <= 0:
        return None
    return carom / bare


def goals(bare: Mapping[str, Any], carom: Mapping[str, Any]) -> dict[str, Any]:
    """Carom's headline figures next to the bare path's, as ratios, and the issue-13 goals."""
    b = bare["latency_ms"]["render_to_server_ms"]
    c_router = carom["latency_ms"]["end_to_end_ms"]
    c_computed = carom["latency_ms"]["render_to_computed_ms"]
    bound = GOAL_P99_RATIO * b["p99"] if b["p99"] is not None else None
    computed_bound = bound + GOAL_COMPUTED_SLACK_MS if bound is not None else None

    def within(v: float | None, limit: float | None) -> bool | None:
        return None if v is None or limit is None else v <= limit

    return {
        "bare_p50": b["p50"],
        "bare_p99": b["p99"],
        "router_p50": c_router["p50"],
        "router_p99": c_router["p99"],
        "router_p50_ratio": ratio(c_router["p50"], b["p50"]),
        "router_p99_ratio": ratio(c_router["p99"], b["p99"]),
        "computed_p99": c_computed["p99"],
        "computed_p99_ratio": ratio(c_computed["p99"], b["p99"]),
        "router_p99_bound": bound,
        "computed_p99_bound": computed_bound,
        "router_p99_ok": within(c_router["p99"], bound),
        "computed_p99_ok": within(c_computed["p99"], computed_bound),
        "bare_kept": bare["kept"],
        "carom_kept": carom["kept"],
        "kept_ok": carom["kept"] >= GOAL_KEPT,
    }


def interactive_goals(
    bare: Mapping[str, Any],
    smooth: Mapping[str, Any],
    interactive: Mapping[str, Any],
    bare_interactive: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Carom interactive beside Carom smooth and the stock bare floor, and the issue-22 goals
    (render->router p50 <= 0.6 x bare p50, p99 <= 0.7 x bare p99)."""
    b = bare["latency_ms"]["render_to_server_ms"]
    s = smooth["latency_ms"]["end_to_end_ms"]
    i = interactive["latency_ms"]["end_to_end_ms"]
    bi = bare_interactive["latency_ms"]["render_to_server_ms"] if bare_interactive else None
    p50, p99 = ratio(i["p50"], b["p50"]), ratio(i["p99"], b["p99"])

    def jitter(run: Mapping[str, Any] | None) -> float | None:
        v = (run or {}).get("webrtc", {}).get("jitter_buffer_ms")
        return float(v) if isinstance(v, int | float) else None

    steady_goals: dict[str, Any] | None = None
    runs = {"bare": bare, "smooth": smooth, "interactive": interactive}
    if bare_interactive:
        runs["bare_interactive"] = bare_interactive
    if all("steady_ms" in r for r in runs.values()):
        st = {name: r["steady_ms"] for name, r in runs.items()}
        sp50 = ratio(st["interactive"]["p50"], st["bare"]["p50"])
        sp99 = ratio(st["interactive"]["p99"], st["bare"]["p99"])
        steady_goals = {
            **{f"{name}_{q}": v[q] for name, v in st.items() for q in ("p50", "p99")},
            "p50_ratio": sp50,
            "p99_ratio": sp99,
            "p50_ok": None if sp50 is None else sp50 <= GOAL_INTERACTIVE_P50,
            "p99_ok": None if sp99 is None else sp99 <= GOAL_INTERACTIVE_P99,
        }

    return {
        "bare_p50": b["p50"],
        "bare_p99": b["p99"],
        "smooth_p50": s["p50"],
        "smooth_p99": s["p99"],
        "interactive_p50": i["p50"],
        "interactive_p99": i["p99"],
        "p50_ratio": p50,
        "p99_ratio": p99,
        "p50_ok": None if p50 is None else p50 <= GOAL_INTERACTIVE_P50,
        "p99_ok": None if p99 is None else p99 <= GOAL_INTERACTIVE_P99,
        "vs_smooth_p50": ratio(i["p50"], s["p50"]),
        "vs_smooth_p99": ratio(i["p99"], s["p99"]),
        "bare_interactive_p50": bi["p50"] if bi else None,
        "bare_interactive_p99": bi["p99"] if bi else None,
        "vs_bare_interactive_p50": ratio(i["p50"], bi["p50"]) if bi else None,
        "vs_bare_interactive_p99": ratio(i["p99"], bi["p99"]) if bi else None,
        "smooth_kept": smooth["kept"],
        "interactive_kept": interactive["kept"],
        "jitter_buffer_smooth_ms": jitter(smooth),
        "jitter_buffer_interactive_ms": jitter(interactive),
        "jitter_buffer_bare_ms": jitter(bare),
        "jitter_buffer_bare_interactive_ms": jitter(bare_interactive),
        "steady": steady_goals,
    }


def published_to_computed(rows: Iterable[Any]) -> list[float]:
    """Carom's Pulsar hop per joined row: report published -> L2 computed, ms."""
    return [
        (r.t_computed_ns - r.t_published_ns) / 1e6
        for r in rows
        if r.status in ("ok", "not_detected")
        and r.t_computed_ns is not None
        and r.t_published_ns is not None
    ]


def pulsar_goals(hop: Mapping[str, Any]) -> dict[str, Any]:
    """Carom's Pulsar hop beside the bare send -> receive of the same run, and the goals."""
    c, ks, ex = hop["carom"], hop["bare_key_shared"], hop["bare_exclusive"]
    return {
        "p50_ratio_key_shared": ratio(c["p50"], ks["p50"]),
        "p99_ratio_key_shared": ratio(c["p99"], ks["p99"]),
        "p50_ratio_exclusive": ratio(c["p50"], ex["p50"]),
        "p50_ok": None if c["p50"] is None else c["p50"] <= GOAL_HOP_P50_MS,
        "p99_ok": None if c["p99"] is None else c["p99"] <= GOAL_HOP_P99_MS,
    }


def rtp_origin(draws: Iterable[int], rtps: Iterable[int], sent_pts: set[int]) -> int | None:
    """Which of aiortc's ``random32()`` draws is the RTP timestamp origin: the one that maps the
    most reported RTP timestamps onto pts this process sent (None if none maps any)."""
    rtp_list = list(rtps)
    best, best_hits = None, 0
    for d in draws:
        hits = sum(((r - d) % RTP_MOD) in sent_pts for r in rtp_list)
        if hits > best_hits:
            best, best_hits = d, hits
    return best


@dataclass(frozen=True)
class Sent:
    frame: int
    t_render_ns: int
    x: float
    y: float


@dataclass(frozen=True)
class Report:
    t_recv_ns: int
    rtp: int
    x: float | None
    y: float | None
    t_browser_recv_ms: float
    t_analysed_ms: float


def decode_report(data: bytes, t_recv_ns: int) -> Report | None:
    """The page's 36-byte report (kind 1) as received; None for anything else."""
    if len(data) != REPORT.size:
        return None
    version, kind, found, _seq, rtp, x, y, t_browser, t_analysed = REPORT.unpack(data)
    if version != 1 or kind != 1:
        return None
    return Report(t_recv_ns, rtp, x if found else None, y if found else None, t_browser,
                  t_analysed)  # fmt: skip


def bare_summary(
    sent: Mapping[int, Sent],
    reports: Sequence[Report],
    origin: int | None,
    skipped: int,
    jitter: Sequence[tuple[int, dict[str, float]]] = (),
) -> dict[str, Any]:
    """Frames due, kept share, L2 and per-hop latency of the bare run.

    ``sent`` maps pts -> frame; a frame is due from the first one sent to the last one reported
    (frames the track skipped because it was late are due and lost, as in Carom); kept = frames
    with a report that found the ball.
    """
    hops: dict[str, list[float]] = {h: [] for h in BARE_HOPS}
    l2: list[float] = []
    reported: dict[int, Report] = {}
    timeline: list[tuple[int, dict[str, float]]] = []
    if origin is not None:
        for r in reports:
            s = sent.get((r.rtp - origin) % RTP_MOD)
            if s is None or s.frame in reported:
                continue
            reported[s.frame] = r
            one = {
                "render_to_browser_ms": r.t_browser_recv_ms - s.t_render_ns / 1e6,
                "browser_decode_to_analysed_ms": r.t_analysed_ms - r.t_browser_recv_ms,
                "analysed_to_server_ms": r.t_recv_ns / 1e6 - r.t_analysed_ms,
                "render_to_server_ms": (r.t_recv_ns - s.t_render_ns) / 1e6,
            }
            for h, v in one.items():
                hops[h].append(v)
            timeline.append((s.t_render_ns, one))
            if r.x is not None and r.y is not None:
                l2.append(math.hypot(r.x - s.x, r.y - s.y))
    frames = [s.frame for s in sent.values()]
    due = (max(reported) - min(frames) + 1) if reported and frames else len(frames) + skipped
    ok = len(l2)
    return {
        "sent": len(sent),
        "skipped_late": skipped,
        "reports": len(reports),
        "frames": due,
        "ok": ok,
        "kept": round(ok / due, 5) if due else 0.0,
        "l2_mean_px": float(np.mean(l2)) if l2 else None,
        "latency_ms": {h: p50_p99(v) for h, v in hops.items()},
        "worst_seconds": worst_seconds([*timeline, *jitter], "render_to_server_ms"),
        "steady_ms": steady(timeline, "render_to_server_ms"),
    }


def worst_seconds(
    timeline: Sequence[tuple[int, Mapping[str, float]]], key: str, top: int = 4
) -> list[dict[str, Any]]:
    """The ``top`` one-second windows (from the first frame) with the largest ``key``, and each
    hop's largest value in that window: where a tail comes from, hop by hop."""
    if not timeline:
        return []
    t0 = min(t for t, hops in timeline if key in hops) if any(key in h for _, h in timeline) else 0
    windows: dict[int, dict[str, float]] = defaultdict(dict)
    for t, hops in timeline:
        if t < t0:
            continue
        w = windows[(t - t0) // 1_000_000_000]
        for h, v in hops.items():
            if not math.isnan(v):
                w[h] = max(w.get(h, -math.inf), v)
    ranked = [kv for kv in windows.items() if key in kv[1]]
    ranked = sorted(ranked, key=lambda kv: -kv[1][key])[:top]
    return [{"second": s, **{h: round(v, 1) for h, v in w.items()}} for s, w in ranked]


def jitter_series(
    samples: Sequence[tuple[int, Mapping[str, Any]]],
) -> list[tuple[int, dict[str, float]]]:
    """Chromium's jitter buffer delay and target per interval between two getStats samples (ms
    per frame emitted in that interval), as timeline entries at the later sample's time."""
    out: list[tuple[int, dict[str, float]]] = []
    for (_, a), (t, b) in itertools.pairwise(samples):
        try:
            n = float(b["jitter_buffer_emitted"]) - float(a["jitter_buffer_emitted"])
            delay = float(b["jitter_buffer_delay_s"]) - float(a["jitter_buffer_delay_s"])
            target = float(b["jitter_buffer_target_s"]) - float(a["jitter_buffer_target_s"])
        except (KeyError, TypeError, ValueError):
            continue
        if n > 0:
            out.append(
                (t, {"jitter_buffer_ms": 1e3 * delay / n, "jitter_target_ms": 1e3 * target / n})
            )
    return out


def carom_timeline(rows: Iterable[Any]) -> list[tuple[int, dict[str, float]]]:
    """(t_render_ns, hop -> ms) of every joined CSV row."""
    out: list[tuple[int, dict[str, float]]] = []
    for r in rows:
        if r.t_render_ns is None or r.status not in ("ok", "not_detected"):
            continue
        hops = {h: v for h in HOPS if isinstance(v := r.latencies_ms.get(h), float)}
        out.append((r.t_render_ns, hops))
    return out


# --- the bare path -------------------------------------------------------------------------------


def find_ball_js(page: str) -> str:
    """``findBall`` exactly as ``live_client.html`` has it (so both paths run the same code)."""
    m = re.search(r"^async function findBall\(.*?^}\n", page, re.S | re.M)
    if m is None:
        raise RuntimeError("live_client.html has no top-level `async function findBall`")
    return m.group(0)


def bare_page(find_ball: str) -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>floor</title></head>
<body><script>
"use strict";
const carom = {{ centroidMs: [] }};
{find_ball}
const floor = window.floor = {{ reported: 0, noBall: 0, unsent: 0, pc: null }};
floor.offer = async () => {{
  const pc = floor.pc = new RTCPeerConnection();
  const tr = pc.addTransceiver("video", {{ direction: "recvonly" }});
  const caps = RTCRtpReceiver.getCapabilities("video").codecs;
  tr.setCodecPreferences([...caps.filter((c) => c.mimeType.toLowerCase() === "video/h264"),
                          ...caps.filter((c) => c.mimeType.toLowerCase() === "video/rtx")]);
  const dc = pc.createDataChannel("reports", {{ ordered: false, maxRetransmits: 0 }});
  dc.binaryType = "arraybuffer";
  pc.ontrack = (ev) => floor.run(ev.track, dc);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {{
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => {{
      if (pc.iceGatheringState === "complete") resolve();
    }});
  }});
  return pc.localDescription.sdp;
}};
floor.answer = (sdp) => floor.pc.setRemoteDescription({{ type: "answer", sdp }});
floor.run = async (track, dc) => {{
  // As live_client.html's onTrack: the same reader, buffer, timestamps and report layout.
  const reader = new MediaStreamTrackProcessor({{ track, maxBufferSize: 8 }}).readable.getReader();
  const scratch = {{}};
  let seq = 0;
  for (;;) {{
    const {{ value: frame, done }} = await reader.read();
    if (done) break;
    const tRead = performance.timeOrigin + performance.now();
    try {{
      const meta = frame.metadata ? frame.metadata() : {{}};
      if (meta.rtpTimestamp === undefined) continue;
      const tRecv = meta.receiveTime !== undefined
        ? performance.timeOrigin + meta.receiveTime : tRead;
      const ball = await findBall(frame, scratch);
      const tAnalysed = performance.timeOrigin + performance.now();
      const buf = new ArrayBuffer({REPORT.size}), dv = new DataView(buf);
      dv.setUint8(0, 1); dv.setUint8(1, 1); dv.setUint16(2, ball ? 1 : 0);
      dv.setUint32(4, seq++ >>> 0); dv.setUint32(8, meta.rtpTimestamp >>> 0);
      dv.setFloat32(12, ball ? ball[0] : NaN); dv.setFloat32(16, ball ? ball[1] : NaN);
      dv.setFloat64(20, tRecv); dv.setFloat64(28, tAnalysed);
      if (dc.readyState === "open") dc.send(buf); else floor.unsent++;
      floor.reported++; if (!ball) floor.noBall++;
    }} finally {{
      frame.close();
    }}
  }}
}};
</script></body></html>"""


class FloorTrack(MediaStreamTrack):
    """The ball, paced on its own clock and rendered on the loop: the least a sender can do.

    Frame n is due at start + n / fps; a recv() more than a frame late skips to the frame due
    now (counted, as the simulator does). ``t_render_ns`` is taken when the frame is handed to
    aiortc's encoder, as in the simulator.
    """

    kind = "video"

    def __init__(self, fps: float, seed: int) -> None:
        super().__init__()
        self.params = PhysicsParams(fps=fps, width=640, height=480, radius=20.0, gravity=0.0,
                                    vx=1000.0, vy=1000.0, cor=1.0, seed=seed)  # fmt: skip
        self.ball = Ball(self.params)
        self.renderer = Renderer(640, 480, 20.0)
        self.fps = fps
        self.start: float | None = None
        self.next = 0
        self.skipped = 0
        self.sent: dict[int, Sent] = {}

    async def recv(self) -> av.VideoFrame:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        wanted = max(self.next, math.floor((now - self.start) * self.fps + 1e-9))
        self.skipped += wanted - self.next
        delay = self.start + wanted / self.fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        while self.ball.frame < wanted:
            self.ball.step()
        x, y = self.ball.position
        video = _video_frame(self.renderer.render_i420(x, y), 640, 480)
        pts = round(wanted * RTP_CLOCK / self.fps)
        video.pts, video.time_base = pts, Fraction(1, RTP_CLOCK)
        self.sent[pts] = Sent(wanted, time.time_ns(), x, y)
        self.next = wanted + 1
        return video


async def _bare(fps: float, seconds: float, latency: str = "smooth") -> dict[str, Any]:
    import aiortc.rtcrtpsender
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from playwright.async_api import Route, async_playwright

    from carom.schemas import playout_delay
    from carom_client import chromium
    from carom_runtime.ice import strip_mdns_candidates
    from carom_simulator import encoder, playout
    from carom_simulator.codecs import force_codec
    from carom_simulator.config import SimulatorSettings

    settings = SimulatorSettings()
    encoder.install(settings.encoder_preset, settings.encoder_threads)  # the simulator's encoder
    draws: list[int] = []
    real_random32 = getattr(aiortc.rtcrtpsender, "random32")  # noqa: B009 - not re-exported

    def recorded() -> int:
        v = int(real_random32())
        draws.append(v)
        return v

    # This process's one sender: record its draws to learn its RTP origin.
    setattr(aiortc.rtcrtpsender, "random32", recorded)  # noqa: B010
    track = FloorTrack(fps, seed=1)
    reports: list[Report] = []
    html = bare_page(find_ball_js(PAGE.read_text()))
    url = "http://127.0.0.1:9/floor.html"  # served by page.route, never by a socket
    pc = RTCPeerConnection()
    stats: dict[str, Any] = {}
    series: list[tuple[int, dict[str, Any]]] = []
    stats_js = f"() => ({chromium.WEBRTC_STATS_JS})(floor.pc)"
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=chromium.CHROMIUM, headless=True, args=chromium.FLAGS
            )
            try:
                page = await browser.new_page()

                async def serve(route: Route) -> None:
                    await route.fulfill(body=html, content_type="text/html")

                await page.route(url, serve)
                await page.goto(url)
                offer, _ = strip_mdns_candidates(await page.evaluate("floor.offer()"))
                tr = pc.addTransceiver(track, direction="sendonly")
                force_codec(tr, "H264", offer=offer)

                def _message(data: bytes | str) -> None:
                    if isinstance(data, bytes):
                        r = decode_report(data, time.time_ns())
                        if r is not None:
                            reports.append(r)

                pc.on("datachannel", lambda ch: ch.on("message", _message))

                await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
                # The stock floor answers as aiortc does; interactive answers the extension.
                delay = playout_delay(latency)
                writer = playout.install(tr, offer, delay) if delay is not None else None
                if delay is not None and writer is None:
                    raise RuntimeError(f"bare path: the offer lacks playout-delay ({latency})")
                await pc.setLocalDescription(await pc.createAnswer())
                await page.evaluate("(sdp) => floor.answer(sdp)", pc.localDescription.sdp)
                deadline = time.monotonic() + 30
                while not reports and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if not reports:
                    raise RuntimeError("bare path: no report from the page within 30 s")
                probe = e2e.CpuProbe({})
                await asyncio.to_thread(probe.start)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    sample = await page.evaluate(stats_js)
                    series.append((time.time_ns(), sample or {}))
                    await asyncio.sleep(max(0.0, min(SAMPLE_S, end - time.monotonic())))
                cpu = await asyncio.to_thread(probe.stop)
                stats = await page.evaluate(stats_js) or {}
                page_counts = await page.evaluate(
                    "() => ({reported: floor.reported, unsent: floor.unsent})"
                )
            finally:
                with contextlib.suppress(Exception):
                    await browser.close()
    finally:
        track.stop()
        await pc.close()
        setattr(aiortc.rtcrtpsender, "random32", real_random32)  # noqa: B010
        encoder.uninstall()
    origin = rtp_origin(draws, (r.rtp for r in reports[:50]), set(track.sent))
    # Due: the session's frames from the first to the last reported one (as Carom's CSV).
    out = bare_summary(track.sent, reports, origin, track.skipped, jitter_series(series))
    out.update(webrtc=stats, page=page_counts, cpu_cores=cpu, origin_known=origin is not None,
               latency=latency)  # fmt: skip
    return out


def run_bare(fps: float, seconds: float, latency: str = "smooth") -> dict[str, Any]:
    return asyncio.run(_bare(fps, seconds, latency))


# --- Carom ---------------------------------------------------------------------------------------


def run_carom(
    pulsar_url: str,
    broker_pid: int | None,
    fps: float,
    seconds: float,
    topics: dict[str, str],
    out_dir: Path,
    latency: str = "smooth",
) -> dict[str, Any]:
    """One Chromium page through the whole stack (as ``bench/e2e.py --clients chromium``)."""
    from carom_client import chromium
    from carom_local.run import Stack, delete_topics, scrape
    from carom_tracker import report

    opts = e2e.stack_options(out_dir, f"carom-{fps:g}fps-{latency}", topics, "floor")
    stack = Stack(pulsar_url, opts)
    pages: list[chromium.PageResult] = []
    cpu: dict[str, float | None] = {}
    sim: dict[str, float] = {}
    try:
        stack.start()
        services = stack.pids()
        if broker_pid is not None:
            services["broker"] = broker_pid
        probe = e2e.CpuProbe(services)

        async def drive() -> None:
            streaming = asyncio.Event()

            async def window() -> None:
                await streaming.wait()
                await asyncio.to_thread(probe.start)
                await asyncio.sleep(seconds)
                cpu.update(await asyncio.to_thread(probe.stop))

            measuring = asyncio.create_task(window())
            pages.extend(
                await chromium.run_pages(
                    stack.router_url,
                    1,
                    seconds,
                    {"fps": fps, "latency": latency},
                    on_streaming=streaming,
                    webrtc_every_s=SAMPLE_S,
                )
            )
            await measuring

        asyncio.run(drive())
        sim = scrape(stack.simulator_url) or {}
        e2e.wait_tracker_settled(stack.tracker_url)
    finally:
        stack.stop()
        delete_topics(opts.admin_url, opts.topics)
    ids = [p.session_id for p in pages if p.session_id]
    series = pages[0].webrtc_series if pages else []
    files = [f for sid in ids if (f := stack.run_dir / f"{sid}.csv").exists()]
    rows = report.load(files).rows if files else []
    summary = e2e.summarise(rows)
    counters = {
        k.split('"')[1]: v for k, v in sim.items() if k.startswith("carom_simulator_frames_total{")
    }
    return {
        **summary,
        "published_to_computed_ms": p50_p99(published_to_computed(rows)),
        "failures": [p.line() for p in pages if not p.ok],
        "webrtc": pages[0].webrtc if pages else {},
        "simulator": {k: counters.get(k) for k in SIMULATOR_COUNTERS},
        "worst_seconds": worst_seconds(
            [*carom_timeline(rows), *jitter_series(series)], "end_to_end_ms"
        ),
        "steady_ms": steady(carom_timeline(rows), "end_to_end_ms"),
        "cpu_cores": cpu,
        "csv_dir": str(stack.run_dir),
        "latency": pages[0].latency if pages else None,
        "csv_latency": sorted({r.latency or "?" for r in rows}),
    }


def run_pulsar_bare(pulsar_url: str, rate: float) -> dict[str, Any]:
    """Bare send -> receive on the same broker at Carom's report rate (item 3's floor)."""
    from bench import tracker_throughput as tt

    out: dict[str, Any] = {}
    for name, key_shared in (("bare_exclusive", False), ("bare_key_shared", True)):
        r = tt.bare_paced(pulsar_url, max(1, round(rate)), PULSAR_BARE_S, 1, key_shared)
        out[name] = {"p50": r.get("p50"), "p99": r.get("p99"), "n": r.get("received")}
    return out


# --- output --------------------------------------------------------------------------------------


def _ms(v: object) -> str:
    return f"{v:.1f}" if isinstance(v, float) else "-"


def _x(v: object) -> str:
    return f"{v:.2f}x" if isinstance(v, float) else "-"


def _yes(v: object) -> str:
    return {True: "yes", False: "NO", None: "-"}[v if isinstance(v, bool) else None]


def _paths(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, key) of each path measured in this run, in the order they ran."""
    out = [("bare", "bare"), ("Carom", "carom")]
    if run.get("interactive"):
        out += [("Carom interactive", "interactive"), ("bare interactive", "bare_interactive")]
    return out


def markdown(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# The floor: bare aiortc -> Chromium vs Carom ({result['when']})",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), Python {m['python']}; load average "
        f"{m['load_avg_1m_at_start']} at the start. `bench/floor.py`, one headless Chromium page, "
        f"{result['seconds']:g} s per measurement, the bare path then Carom, one after the other. "
        "*Bare*: frame handed to aiortc's encoder -> the page's report (same `findBall` as "
        "live_client.html) received back by the sending process over a DataChannel. *Carom*: "
        "render -> router and render -> L2 computed, from the tracker's CSV. *Kept*: share of "
        "the frames due (skipped-as-late included) with a report (bare) or an L2 row (Carom).",
        "",
        "| fps | bare p50 / p99 ms | Carom render→router p50 / p99 ms | ratio p50 / p99 "
        "| Carom render→computed p99 ms (ratio) | bare kept | Carom kept "
        "| goal: router p99 ≤ 1.5×bare / computed ≤ that + 8 ms / kept ≥ 99.9% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        g = r["goals"]
        lines.append(
            f"| {r['fps']:g} | {_ms(g['bare_p50'])} / {_ms(g['bare_p99'])} "
            f"| {_ms(g['router_p50'])} / {_ms(g['router_p99'])} "
            f"| {_x(g['router_p50_ratio'])} / {_x(g['router_p99_ratio'])} "
            f"| {_ms(g['computed_p99'])} ({_x(g['computed_p99_ratio'])}) "
            f"| {g['bare_kept']:.2%} | {g['carom_kept']:.2%} "
            f"| {_yes(g['router_p99_ok'])} (≤ {_ms(g['router_p99_bound'])}) / "
            f"{_yes(g['computed_p99_ok'])} (≤ {_ms(g['computed_p99_bound'])}) / "
            f"{_yes(g['kept_ok'])} |"
        )
    lines += [
        "",
        "Pulsar hop, same broker, right after Carom: a bare send -> receive at the same rate "
        "(plain producer, Exclusive and Key_Shared consumers, "
        f"{PULSAR_BARE_S:g} s each) beside Carom's report published -> L2 computed (goal p50 ≤ "
        f"{GOAL_HOP_P50_MS:g} ms, p99 ≤ {GOAL_HOP_P99_MS:g} ms), ms:",
        "",
        "| msg/s | bare Exclusive p50 / p99 | bare Key_Shared p50 / p99 "
        "| Carom published→computed p50 / p99 | ratio to Key_Shared p50 / p99 | goal p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        hop, pg = r.get("pulsar"), r.get("pulsar_goals")
        if not hop or not pg:
            continue
        ex, ks, c = hop["bare_exclusive"], hop["bare_key_shared"], hop["carom"]
        lines.append(
            f"| {r['fps']:g} | {_ms(ex['p50'])} / {_ms(ex['p99'])} "
            f"| {_ms(ks['p50'])} / {_ms(ks['p99'])} | {_ms(c['p50'])} / {_ms(c['p99'])} "
            f"| {_x(pg['p50_ratio_key_shared'])} / {_x(pg['p99_ratio_key_shared'])} "
            f"| {_yes(pg['p50_ok'])} / {_yes(pg['p99_ok'])} |"
        )
    fast_runs = [r for r in result["runs"] if r.get("interactive_goals")]
    if fast_runs:
        mode = fast_runs[0]["interactive_mode"]
        lines += [
            "",
            f"Interactive mode (`latency={mode}`: the playout-delay RTP header extension at "
            f"{mode if '-' in mode else 'min = max = 0'}, so Chromium renders each frame as soon "
            "as it is decoded), measured in the same run: Carom render→router beside Carom smooth "
            "and the stock bare floor above; *bare interactive* is the bare path answering and "
            "writing the extension itself (the floor of this mode). Goal: Carom interactive p50 ≤ "
            f"{GOAL_INTERACTIVE_P50:g}× and p99 ≤ {GOAL_INTERACTIVE_P99:g}× the stock bare "
            "floor's. Jitter buffer: getStats jitterBufferDelay per frame, ms.",
            "",
            "| fps | bare p50 / p99 | Carom smooth p50 / p99 | Carom interactive p50 / p99 "
            "| ratio to bare p50 / p99 | goal p50 / p99 | bare interactive p50 / p99 "
            "| kept smooth / interactive | jitter buffer bare / smooth / interactive / bare int. |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fast_runs:
            g = r["interactive_goals"]
            lines.append(
                f"| {r['fps']:g} | {_ms(g['bare_p50'])} / {_ms(g['bare_p99'])} "
                f"| {_ms(g['smooth_p50'])} / {_ms(g['smooth_p99'])} "
                f"| {_ms(g['interactive_p50'])} / {_ms(g['interactive_p99'])} "
                f"| {_x(g['p50_ratio'])} / {_x(g['p99_ratio'])} "
                f"| {_yes(g['p50_ok'])} / {_yes(g['p99_ok'])} "
                f"| {_ms(g['bare_interactive_p50'])} / {_ms(g['bare_interactive_p99'])} "
                f"| {g['smooth_kept']:.2%} / {g['interactive_kept']:.2%} "
                f"| {_ms(g['jitter_buffer_bare_ms'])} / {_ms(g['jitter_buffer_smooth_ms'])} / "
                f"{_ms(g['jitter_buffer_interactive_ms'])} / "
                f"{_ms(g['jitter_buffer_bare_interactive_ms'])} |"
            )
        steady_runs = [r for r in fast_runs if r["interactive_goals"].get("steady")]
        if steady_runs:
            lines += [
                "",
                f"The same, steady state: frames rendered {STEADY_AFTER_S:g} s or more after each "
                "path's first (before that, the session's start-up: see *Worst seconds*), "
                "render→router ms:",
                "",
                "| fps | bare p50 / p99 | Carom smooth p50 / p99 | Carom interactive p50 / p99 "
                "| ratio to bare p50 / p99 | goal p50 / p99 | bare interactive p50 / p99 |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in steady_runs:
                t = r["interactive_goals"]["steady"]
                lines.append(
                    f"| {r['fps']:g} | {_ms(t['bare_p50'])} / {_ms(t['bare_p99'])} "
                    f"| {_ms(t['smooth_p50'])} / {_ms(t['smooth_p99'])} "
                    f"| {_ms(t['interactive_p50'])} / {_ms(t['interactive_p99'])} "
                    f"| {_x(t['p50_ratio'])} / {_x(t['p99_ratio'])} "
                    f"| {_yes(t['p50_ok'])} / {_yes(t['p99_ok'])} "
                    f"| {_ms(t.get('bare_interactive_p50'))} / "
                    f"{_ms(t.get('bare_interactive_p99'))} |"
                )
    lines += ["", "Per hop, p50 / p99 ms:", "",
              "| fps | path | render→page | page analysis | →server | Pulsar→tracker "
              "| tracker join |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def pp(d: Mapping[str, Any]) -> str:
        return f"{_ms(d['p50'])} / {_ms(d['p99'])}"

    for r in result["runs"]:
        for path, key in _paths(r):
            d = r[key]["latency_ms"]
            if key.startswith("bare"):
                lines.append(
                    f"| {r['fps']:g} | {path} | {pp(d['render_to_browser_ms'])} "
                    f"| {pp(d['browser_decode_to_analysed_ms'])} "
                    f"| {pp(d['analysed_to_server_ms'])} | | |"
                )
            else:
                lines.append(
                    f"| {r['fps']:g} | {path} | {pp(d['render_to_browser_ms'])} "
                    f"| {pp(d['browser_decode_to_analysed_ms'])} "
                    f"| {pp(d['analysed_to_router_ms'])} | {pp(d['published_to_tracker_ms'])} "
                    f"| {pp(d['tracker_to_computed_ms'])} |"
                )
    lines += [
        "",
        "Worst seconds (from the first frame), largest value per hop in that second, ms:",
        "",
        "| fps | path | second | render→page | analysis | →server | Pulsar→tracker | join "
        "| render→server | render→computed | jitter buffer / target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        for path, key in _paths(r):
            for w in r[key]["worst_seconds"]:
                to_server = w.get("analysed_to_server_ms", w.get("analysed_to_router_ms"))
                total = w.get("render_to_server_ms", w.get("end_to_end_ms"))
                lines.append(
                    f"| {r['fps']:g} | {path} | {w['second']} "
                    f"| {_ms(w.get('render_to_browser_ms'))} "
                    f"| {_ms(w.get('browser_decode_to_analysed_ms'))} | {_ms(to_server)} "
                    f"| {_ms(w.get('published_to_tracker_ms'))} "
                    f"| {_ms(w.get('tracker_to_computed_ms'))} | {_ms(total)} "
                    f"| {_ms(w.get('render_to_computed_ms'))} "
                    f"| {_ms(w.get('jitter_buffer_ms'))} / {_ms(w.get('jitter_target_ms'))} |"
                )
    lines += ["", "Sender and receiver counters:", ""]
    for r in result["runs"]:
        for path, key in _paths(r):
            d = r[key]
            w = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in
                 (d.get("webrtc") or {}).items() if v is not None}  # fmt: skip
            extra = (
                f"skipped late {d['skipped_late']}"
                if key.startswith("bare")
                else f"simulator {d['simulator']}"
            )
            lines.append(f"- {r['fps']:g} fps {path}: {extra}; Chromium inbound-rtp {w}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", default="30,60", help="comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, metavar="SECONDS",
                        help="an unmeasured Carom run first (default 60 s when this run starts "
                        "the broker, else 10 s): a broker just started spends its first minute "
                        "compiling; after a 15 s warm-up, Carom smooth measured 1.21x / 2.51x the "
                        "bare p50 / p99 at 60 fps, with a warm broker 1.03x / 1.12x")  # fmt: skip
    parser.add_argument("--interactive", default="interactive", metavar="MODE",
                        help="the playout mode measured beside smooth, on Carom and on the bare "
                        "path (interactive, MIN-MAX ms, or none)")  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--metrics-dir", type=Path, default=ROOT / "metrics",
                        help="Carom's tracker CSVs go here, a folder per bench run")  # fmt: skip
    args = parser.parse_args(argv)
    if args.interactive != "none":
        from carom.schemas import playout_delay

        try:
            if playout_delay(args.interactive) is None:
                parser.error("--interactive: smooth is always measured; give another mode")
        except ValueError as exc:
            parser.error(f"--interactive: {exc}")

    from carom_local import pulsar as local_pulsar
    from carom_local.run import delete_topics, private_topics
    from carom_runtime.ice import set_host_addresses

    set_host_addresses(["127.0.0.1"])
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir = args.metrics_dir / f"floor-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    topics = private_topics(f"floor-{uuid.uuid4().hex[:8]}")

    def on_sigterm(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    info = e2e.machine()
    print(f"floor: {info}", flush=True)
    try:
        broker = local_pulsar.start()
    except local_pulsar.PulsarError as exc:
        print(f"floor: {exc}", file=sys.stderr)
        return 1
    broker_pid = local_pulsar._pid() if broker.admin_url.startswith("http://127.0.0.1") else None
    runs: list[dict[str, Any]] = []
    try:
        warmup = args.warmup if args.warmup is not None else 60.0 if broker.started_here else 10.0
        if warmup > 0:
            print(f"floor: warm-up, Carom {warmup:g} s (not measured) ...", flush=True)
            run_carom(broker.service_url, None, e2e._floats(args.fps)[0], warmup, topics,
                      out_dir / "warmup")  # fmt: skip
        for fps in e2e._floats(args.fps):
            print(f"floor: {fps:g} fps, bare aiortc -> Chromium ...", flush=True)
            bare = run_bare(fps, args.duration)
            print(f"floor: bare {fps:g} fps: {bare['latency_ms']['render_to_server_ms']}, "
                  f"kept {bare['kept']}", flush=True)  # fmt: skip
            print(f"floor: {fps:g} fps, Carom ...", flush=True)
            carom = run_carom(broker.service_url, broker_pid, fps, args.duration, topics, out_dir)
            print(f"floor: Carom {fps:g} fps: {carom['latency_ms']['end_to_end_ms']}, "
                  f"kept {carom['kept']}", flush=True)  # fmt: skip
            run = {"fps": fps, "bare": bare, "carom": carom, "goals": goals(bare, carom)}
            if args.interactive != "none":
                mode = args.interactive
                print(f"floor: {fps:g} fps, Carom {mode} ...", flush=True)
                fast = run_carom(broker.service_url, broker_pid, fps, args.duration, topics,
                                 out_dir, latency=mode)  # fmt: skip
                print(f"floor: Carom {mode} {fps:g} fps: {fast['latency_ms']['end_to_end_ms']}, "
                      f"kept {fast['kept']}", flush=True)  # fmt: skip
                print(f"floor: {fps:g} fps, bare {mode} ...", flush=True)
                bare_fast = run_bare(fps, args.duration, latency=mode)
                print(f"floor: bare {mode} {fps:g} fps: "
                      f"{bare_fast['latency_ms']['render_to_server_ms']}", flush=True)  # fmt: skip
                fast_goals = interactive_goals(bare, carom, fast, bare_fast)
                run.update(interactive=fast, bare_interactive=bare_fast, interactive_mode=mode,
                           interactive_goals=fast_goals)  # fmt: skip
            hop = run_pulsar_bare(broker.service_url, fps)
            hop["carom"] = carom["published_to_computed_ms"]
            print(f"floor: Pulsar hop {fps:g} msg/s: {hop}", flush=True)
            run.update(pulsar=hop, pulsar_goals=pulsar_goals(hop))
            runs.append(run)
    except KeyboardInterrupt:
        print("\nfloor: interrupted; stopped what it started; no results written", flush=True)
        return 130
    except RuntimeError as exc:
        print(f"floor: {exc}; see the service logs in {out_dir}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        delete_topics(broker.admin_url, topics)
        if broker.started_here and not os.environ.get("CAROM_KEEP_PULSAR"):
            local_pulsar.stop(quiet=True)
    result = {"bench": "floor", "when": when, "machine": info, "seconds": args.duration,
              "runs": runs}  # fmt: skip
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "floor.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.results_dir / "floor.md").write_text(md)
    print(md)
    print(f"floor: wrote {args.results_dir / 'floor.json'} and floor.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
