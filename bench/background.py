"""Video-file backgrounds: does the page's colour detection survive them, and what do they cost?

Usage: ``.venv/bin/python bench/background.py [--frames 300] [--size 640x480] [--fps 30]``.
Results: ``bench/results/background.json`` and ``background.md``; the table is printed too.

Each row renders ``--frames`` frames of the bouncing ball (the service's physics and renderer)
over one background, encodes them with the simulator's own H.264 encoder (aiortc's, libx264
tuned as the service runs it: superfast, one thread, zerolatency, Baseline, 1 Mbps), packetizes
them as RTP, depacketizes and decodes them with aiortc's receiver-side decoder, and runs the
page's detector (``carom_client.centroid.centroid_i420``: Cr > 135, weight Cr - 128, V plane) on
every decoded frame. Per row: *detected*, frames where the detector found anything; *L2*,
distance of the found centre from the true one over the detected frames; *off-ball*, detections
more than the ball's radius from the true centre (the reported point is not on the ball at all);
*phantom*, the same background encoded without the ball, share of frames where the detector
still finds a "ball". *Interference* is ``carom_simulator.background.chroma_interference`` of
the background before encoding (worst frame): what the simulator can know at session start.

Rows: ``plain`` (black), the generated ``texture`` and ``warm`` clips, then a dose-response
series: the texture clip with one static square patch of a warm colour (near the top-left
corner, at luma (96, 96)) whose side is chosen so the patch covers a given share of the chroma
samples. Two colours: a skin tone (Cr 154, just above the threshold) and the ball's own
orange-red (Cr 222, the worst case). The series is what ``check_background``'s limit is read from.

What it showed (bench/results/background.md, 300 frames a row): the texture alone, with no warm
sample, already costs precision (L2 mean 0.01 -> 0.31 px, p99 0.02 -> 1.27 px: at 1 Mbps the
busy background takes the bits the ball's edge had) and 4x the encode time. One ball-coloured
chroma sample (a share of 1.3e-5) pulls the mean to 1.1 px and makes the detector see a ball in
95% of frames that have none; from 3e-4 most detections are off the ball. Hence a limit of zero,
and a warning rather than a refusal (reasons in ``check_background``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from aiortc.codecs.h264 import H264Decoder, H264PayloadDescriptor
from aiortc.jitterbuffer import JitterFrame

from carom_client.centroid import V_THRESHOLD as PAGE_V_THRESHOLD
from carom_client.centroid import centroid_i420
from carom_simulator.background import (
    INTERFERENCE_LIMIT,
    INTERFERENCE_OFF_BALL,
    V_THRESHOLD,
    BackgroundSource,
    check_background,
    chroma_interference,
    measure_interference,
    resolve_background,
)
from carom_simulator.config import SimulatorSettings
from carom_simulator.encoder import TunedH264Encoder
from carom_simulator.physics import Ball, PhysicsParams
from carom_simulator.render import BALL_RGB, Renderer, i420_planes, rgb_to_ycbcr601
from carom_simulator.track import _video_frame as video_frame

RESULTS = Path(__file__).resolve().parent / "results"
U8 = npt.NDArray[np.uint8]
#: Dose-response: target shares of chroma samples covered by the warm patch.
PATCH_SHARES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
PATCH_COLOURS = {"skin": (225, 170, 140), "ball": BALL_RGB}
#: Where the patch sits (luma pixels): near a corner, so the ball is often far from it.
PATCH_CENTRE = (96, 96)


@dataclass
class Row:
    background: str
    interference_worst: float
    frames: int
    detected: int
    detection_rate: float
    l2_mean: float | None
    l2_p50: float | None
    l2_p99: float | None
    l2_max: float | None
    off_ball: int
    phantom_rate: float
    encode_ms_p50: float
    kbps: float
    warning: str | None


def _encoder() -> TunedH264Encoder:
    defaults = SimulatorSettings()
    encoder = TunedH264Encoder()
    encoder.preset, encoder.threads = defaults.encoder_preset, defaults.encoder_threads
    return encoder


def _round_trip(
    frames: Iterator[U8], width: int, height: int, fps: float
) -> Iterator[tuple[U8, float, int]]:
    """Encode, packetize, depacketize and decode each frame as a session would; yields the
    decoded I420, the encode time (s) and the payload bytes of each frame."""
    encoder, decoder = _encoder(), H264Decoder()
    step = round(90000 / fps)
    for index, arr in enumerate(frames):
        frame = video_frame(arr, width, height)
        frame.pts, frame.time_base = index * step, Fraction(1, 90000)
        t0 = time.perf_counter()
        payloads, timestamp = encoder.encode(frame)
        spent = time.perf_counter() - t0
        data = b"".join(H264PayloadDescriptor.parse(p)[1] for p in payloads)
        decoded = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
        if len(decoded) != 1:
            raise RuntimeError(f"frame {index}: decoder returned {len(decoded)} frames")
        out = decoded[0].to_ndarray(format="yuv420p")  # type: ignore[attr-defined]
        yield out, spent, sum(len(p) for p in payloads)


def _patch(share: float, rgb: tuple[int, int, int], width: int, height: int) -> Callable[[U8], U8]:
    """A function drawing a square patch covering ``share`` of the chroma samples (rounded to
    whole samples, at least one) over a background frame (returns a new array)."""
    side_c = max(1, round(math.sqrt(share * (width // 2) * (height // 2))))
    ycc = [round(c) for c in rgb_to_ycbcr601(*rgb)]
    cy, cx = PATCH_CENTRE[1] // 2, PATCH_CENTRE[0] // 2
    r0, c0 = cy - side_c // 2, cx - side_c // 2

    def draw(bg: U8) -> U8:
        out = bg.copy()
        y, u, v = i420_planes(out, width, height)
        y[2 * r0 : 2 * (r0 + side_c), 2 * c0 : 2 * (c0 + side_c)] = ycc[0]
        u[r0 : r0 + side_c, c0 : c0 + side_c] = ycc[1]
        v[r0 : r0 + side_c, c0 : c0 + side_c] = ycc[2]
        return out

    return draw


def run_row(
    name: str,
    source: BackgroundSource | None,
    alter: Callable[[U8], U8] | None,
    args: argparse.Namespace,
) -> Row:
    width, height, fps, n = args.size[0], args.size[1], args.fps, args.frames
    params = PhysicsParams(fps=fps, seed=1, width=width, height=height)
    ball, renderer = Ball(params), Renderer(width, height, params.radius)
    truths: list[tuple[float, float]] = []
    worst = 0.0

    def background(index: int) -> U8 | None:
        nonlocal worst
        if source is None:
            return None
        bg = source.frame(index, fps, width, height)
        if alter is not None:
            bg = alter(bg)
        worst = max(worst, chroma_interference(bg, width, height))
        return bg

    def with_ball() -> Iterator[U8]:
        for index in range(n):
            x, y = ball.step()
            truths.append((x, y))
            yield renderer.render_i420(x, y, background(index))

    black = np.empty((height * 3 // 2, width), dtype=np.uint8)
    for plane, value in zip(
        i420_planes(black, width, height), rgb_to_ycbcr601(0, 0, 0), strict=True
    ):
        plane[...] = round(value)

    def without_ball() -> Iterator[U8]:
        for index in range(n // 2):
            bg = background(index)
            yield black if bg is None else np.array(bg)

    found: list[tuple[float, float] | None] = []
    encode_s: list[float] = []
    total_bytes = 0
    for decoded, spent, size in _round_trip(with_ball(), width, height, fps):
        encode_s.append(spent)
        total_bytes += size
        found.append(centroid_i420(decoded, width, height))
    l2 = [
        math.hypot(f[0] - t[0], f[1] - t[1])
        for f, t in zip(found, truths, strict=True)
        if f is not None
    ]
    off_ball = sum(err > params.radius for err in l2)
    phantoms = sum(
        centroid_i420(decoded, width, height) is not None
        for decoded, _, _ in _round_trip(without_ball(), width, height, fps)
    )
    l2_sorted = sorted(l2)

    def pct(q: float) -> float | None:
        if not l2_sorted:
            return None
        return round(l2_sorted[min(len(l2_sorted) - 1, math.ceil(q * len(l2_sorted)) - 1)], 4)

    return Row(
        background=name,
        interference_worst=worst,
        frames=n,
        detected=len(l2),
        detection_rate=len(l2) / n,
        l2_mean=round(statistics.fmean(l2), 4) if l2 else None,
        l2_p50=pct(0.50),
        l2_p99=pct(0.99),
        l2_max=round(l2_sorted[-1], 4) if l2 else None,
        off_ball=off_ball,
        phantom_rate=phantoms / (n // 2),
        encode_ms_p50=round(statistics.median(encode_s[10:]) * 1e3, 3),
        kbps=round(total_bytes * 8 * fps / n / 1e3, 1),
        warning=check_background(worst),
    )


def timings(source_path: Path) -> dict[str, float]:
    """Median-of-repeats per-frame costs (ms): render with and without a background, and the
    background source's decode + scale, at 640x480 and 1280x720."""
    out: dict[str, float] = {}
    for width, height in ((640, 480), (1280, 720)):
        renderer = Renderer(width, height, 20.0)
        with BackgroundSource(source_path) as source:
            frames = 120
            t0 = time.perf_counter()
            for index in range(frames):
                bg = source.frame(index, 30.0, width, height)
            out[f"background_frame_{width}x{height}"] = round(
                (time.perf_counter() - t0) / frames * 1e3, 3
            )
        number = 1000
        calls: dict[str, Callable[[], object]] = {
            "render_plain": partial(renderer.render_i420, 301.3, 207.7),
            "render_background": partial(renderer.render_i420, 301.3, 207.7, bg),
        }
        for label, call in calls.items():
            best = min(timeit.repeat(call, number=number, repeat=5)) / number
            out[f"{label}_{width}x{height}"] = round(best * 1e3, 4)
    return out


def _size(text: str) -> tuple[int, int]:
    width, height = (int(part) for part in text.lower().split("x"))
    return (width, height)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| background | interference (worst frame) | detected | L2 mean / p50 / p99 / max px "
        "| off-ball | phantom | encode ms p50 | kbps | check_background |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.background} | {r.interference_worst:.2e} | {r.detection_rate:.1%} "
            f"| {_fmt(r.l2_mean)} / {_fmt(r.l2_p50)} / {_fmt(r.l2_p99)} / {_fmt(r.l2_max)} "
            f"| {r.off_ball} | {r.phantom_rate:.1%} | {r.encode_ms_p50:.2f} | {r.kbps:.0f} "
            f"| {'warn' if r.warning else 'ok'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=_size, default=(640, 480))
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-patches", action="store_true", help="skip the dose-response rows")
    args = parser.parse_args()
    assert V_THRESHOLD == PAGE_V_THRESHOLD, "the simulator's copy of the page's threshold drifted"
    width, height = args.size
    started = datetime.now(UTC)
    rows: list[Row] = []
    clips: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="carom-bg-") as cache:
        paths: dict[str, Path] = {}
        for name in ("texture", "warm"):
            t0 = time.perf_counter()
            path = resolve_background(name, None, cache_dir=Path(cache))
            assert path is not None
            generate_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            measured = measure_interference(path, width, height)
            clips[name] = {
                "generate_s": round(generate_s, 2),
                "bytes": path.stat().st_size,
                "interference": asdict(measured),
                "measure_s": round(time.perf_counter() - t0, 3),
            }
            paths[name] = path
        rows.append(run_row("plain", None, None, args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        for name, path in paths.items():
            with BackgroundSource(path) as source:
                rows.append(run_row(name, source, None, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.no_patches:
            for colour, rgb in PATCH_COLOURS.items():
                for share in PATCH_SHARES:
                    with BackgroundSource(paths["texture"]) as source:
                        row = run_row(
                            f"texture+{colour} {share:g}",
                            source,
                            _patch(share, rgb, width, height),
                            args,
                        )
                    rows.append(row)
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
        costs = timings(paths["texture"])
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "settings": {
            "frames": args.frames,
            "width": width,
            "height": height,
            "fps": args.fps,
            "radius": PhysicsParams().radius,
            "encoder": "aiortc H264Encoder + TunedH264Encoder (SimulatorSettings defaults), 1 Mbps",
            "v_threshold": V_THRESHOLD,
            "interference_limit": INTERFERENCE_LIMIT,
            "interference_off_ball": INTERFERENCE_OFF_BALL,
            "patch_centre": PATCH_CENTRE,
        },
        "clips": clips,
        "timings_ms": costs,
        "rows": [asdict(r) for r in rows],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "background.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Backgrounds ({result['started']})",
        "",
        f"{width}x{height} at {args.fps:g} fps, {args.frames} frames per row (phantom: "
        f"{args.frames // 2} frames without the ball), H.264 as the service encodes it, decoded "
        "as a receiver does, detected as the page does (`bench/background.py`). Machine: "
        f"{os.cpu_count()} cores, load {result['machine']['load_avg_1m']}.",
        "",
        table(rows),
        "",
        "Clips: "
        + "; ".join(
            f"{k}: generated in {v['generate_s']} s, {v['bytes'] / 1e6:.1f} MB, interference "
            f"worst {v['interference']['worst']:.2e} ({v['interference']['samples']} samples, "
            f"{v['measure_s']} s)"
            for k, v in clips.items()
        ),
        "",
        "Per-frame cost, ms: " + ", ".join(f"{k} {v}" for k, v in costs.items()),
        "",
    ]
    (args.results_dir / "background.md").write_text("\n".join(md))
    print()
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
