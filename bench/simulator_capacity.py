"""Simulator capacity: sessions per core at 30 fps 640x480, and render / encode cost per frame.

Usage: ``.venv/bin/python bench/simulator_capacity.py [--sessions 1,2,4,...] [--seconds 10]``
(starts the local broker unless ``PULSAR_URL`` is set). Results: ``bench/results/simulator.json``
and ``bench/results/simulator.md``.

The simulator runs as its own process (as in production) and publishes truth to the real broker.
The receiving aiortc clients run in this process, so the two compete for the same cores: on a
2-core machine that makes the figures conservative. A frame is *on time* when the track released
it at its slot instead of dropping it as late (``sent / (sent + late_dropped)``, from the
simulator's own counters over the measured window). Sessions per core = sessions /
(simulator CPU seconds per wall second) at the largest count that keeps >= 99.5% on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from carom_client.video import VideoClient
from carom_local import pulsar as local_pulsar
from carom_runtime.ice import set_host_addresses
from carom_simulator.config import SimulatorSettings
from carom_simulator.encoder import TunedH264Encoder
from carom_simulator.physics import Ball, PhysicsParams
from carom_simulator.render import Renderer
from carom_simulator.track import _video_frame as video_frame

RESULTS = Path(__file__).resolve().parent / "results"
TICKS = os.sysconf("SC_CLK_TCK")
#: The simulator's session API wants a token (as the router sends): one per run, given by env.
TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def micro(preset: str, frames: int = 600) -> dict[str, float]:
    """Per-frame cost of each stage at 640x480 on one core (median ms), as the service runs."""
    params = PhysicsParams(fps=30.0, seed=1)
    ball, renderer = Ball(params), Renderer(params.width, params.height, params.radius)
    defaults = SimulatorSettings()
    encoder = TunedH264Encoder()
    encoder.preset, encoder.threads = preset, defaults.encoder_threads
    step, render, wrap, encode = [], [], [], []
    for i in range(frames):
        t0 = time.perf_counter()
        x, y = ball.step()
        t1 = time.perf_counter()
        arr = renderer.render_i420(x, y)
        t2 = time.perf_counter()
        frame = video_frame(arr, params.width, params.height)
        frame.pts, frame.time_base = i * 3000, Fraction(1, 90000)
        t3 = time.perf_counter()
        payloads, _ = encoder.encode(frame)
        t4 = time.perf_counter()
        assert payloads
        step.append(t1 - t0)
        render.append(t2 - t1)
        wrap.append(t3 - t2)
        encode.append(t4 - t3)

    def ms(xs: list[float]) -> float:
        return round(float(np.median(xs[30:])) * 1e3, 3)  # skip the encoder's warm-up

    return {
        "physics_ms": ms(step),
        "render_i420_ms": ms(render),
        "videoframe_ms": ms(wrap),
        "h264_encode_ms": ms(encode),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _session_stats(http: httpx.AsyncClient, url: str) -> dict[str, dict[str, Any]]:
    r = await http.get(f"{url}/sessions")
    return {s["session_id"]: s["stats"] for s in r.json()}


async def measure(url: str, pid: int, n: int, seconds: float, fps: float) -> dict[str, Any]:
    clients: list[VideoClient] = []
    counts = [0] * n
    sids = [f"cap-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]
    async with httpx.AsyncClient(timeout=30, headers=AUTH) as http:
        try:
            for i, sid in enumerate(sids):

                def count(_f: object, i: int = i) -> None:
                    counts[i] += 1

                c = VideoClient(count)
                clients.append(c)
                r = await http.post(
                    f"{url}/offer",
                    json={"session_id": sid, "sdp": await c.offer(), "params": {"fps": fps}},
                )
                r.raise_for_status()
                await c.accept(r.json()["sdp"])
            await asyncio.sleep(3.0)  # connect + warm up
            s0, c0, t0 = await _session_stats(http, url), cpu_seconds(pid), time.monotonic()
            r0 = list(counts)
            await asyncio.sleep(seconds)
            s1, c1, t1 = await _session_stats(http, url), cpu_seconds(pid), time.monotonic()
            r1 = list(counts)
        finally:
            for sid in sids:
                await http.delete(f"{url}/sessions/{sid}")
            for c in clients:
                await c.close()
    sent = sum(s1[s]["frames_sent"] - s0[s]["frames_sent"] for s in sids)
    late = sum(s1[s]["frames_late_dropped"] - s0[s]["frames_late_dropped"] for s in sids)
    gen_late = sum(s1[s]["generation_late"] - s0[s]["generation_late"] for s in sids)
    cores = (c1 - c0) / (t1 - t0)
    expected = n * fps * (t1 - t0)
    return {
        "sessions": n,
        "fps": fps,
        "seconds": round(t1 - t0, 2),
        "frames_sent": sent,
        "frames_expected": round(expected),
        "frames_late_dropped": late,
        "generation_late": gen_late,
        "on_time": round(sent / (sent + late), 5) if sent + late else 0.0,
        "release_lag_ms_max": round(max(s1[s]["release_lag_ms_max"] for s in sids), 2),
        "frames_received_by_clients": sum(r1) - sum(r0),
        "simulator_cores": round(cores, 3),
        "simulator_core_per_session": round(cores / n, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,2,4,6,8,10,12")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--encoder-preset", default=SimulatorSettings().encoder_preset)
    args = parser.parse_args()
    set_host_addresses(["127.0.0.1"])
    costs = micro(args.encoder_preset)
    print("per-frame cost (ms):", costs, flush=True)
    broker = local_pulsar.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    topic = f"persistent://public/default/bench-truth-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "carom_simulator", "--http-port", str(port),
         "--pulsar-url", broker.service_url, "--pulsar-topics-truth", topic,
         "--max-sessions", "64", "--log-level", "warning",
         "--encoder-preset", args.encoder_preset],
        env={**os.environ, "CAROM_SIMULATOR__ACCESS__TOKEN": TOKEN},
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        for n in (int(x) for x in args.sessions.split(",")):
            row = asyncio.run(measure(url, proc.pid, n, args.seconds, args.fps))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["on_time"] < 0.995:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        if broker.started_here:
            local_pulsar.stop()
    good = [r for r in rows if r["on_time"] >= 0.995]
    best = max(good, key=lambda r: r["sessions"]) if good else None
    per_core = round(best["sessions"] / best["simulator_cores"], 1) if best else 0.0
    result = {
        "bench": "simulator_capacity",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}",
        "encoder_preset": args.encoder_preset,
        "per_frame_cost_ms": costs,
        "runs": rows,
        "largest_on_time_sessions": best["sessions"] if best else 0,
        "sessions_per_simulator_core": per_core,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "simulator.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Simulator capacity ({result['when']}, {result['machine']})",
        "",
        f"{args.fps:g} fps, 640x480, H.264 (libx264 {args.encoder_preset}, "
        f"{SimulatorSettings().encoder_threads} thread); clients in a second process on the "
        "same cores.",
        "",
        "Per-frame cost, median ms on one core: "
        + ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in costs.items()),
        "",
        "| sessions | on time | late dropped | simulator cores | cores/session "
        "| frames to clients |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sessions']} | {r['on_time']:.2%} | {r['frames_late_dropped']} "
            f"| {r['simulator_cores']} | {r['simulator_core_per_session']} "
            f"| {r['frames_received_by_clients']}/{r['frames_expected']} |"
        )
    lines += [
        "",
        f"Largest session count with >= 99.5% of frames on time: "
        f"{result['largest_on_time_sessions']}; sessions per simulator core there: {per_core}.",
        "",
    ]
    (RESULTS / "simulator.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
