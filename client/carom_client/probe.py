"""``carom-probe``: watch sessions straight from the simulator and score them against the truth.

Until the router and tracker carry reports, this is Carom's end-to-end check on one machine:
simulator -> WebRTC H.264 -> Python client (decode, find the ball) and simulator -> Pulsar truth
topic -> the same client, joined on the RTP timestamp. It prints, per session and overall, frames
decoded, frames matched to their truth, L2 error and render -> decoded latency.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np
import pulsar

from carom import accounting, schemas
from carom.signaling import auth_headers
from carom_client.video import DecodedFrame, open_direct
from carom_runtime.config import PulsarSettings, TopicNames
from carom_runtime.ice import set_host_addresses
from carom_runtime.pulsar_io import TopicReader, make_client, quiet_logger


class TruthIndex:
    """The truth topic, read on a thread of its own, indexed by (session, rtp_ts), bounded."""

    def __init__(self, client: pulsar.Client, topic: str, sessions: set[str], cap: int) -> None:
        self.sessions = sessions
        self.cap = cap
        self.by_key: dict[tuple[str, int], schemas.Truth] = {}
        self.invalid = 0
        self._lock = threading.Lock()
        self._reader = TopicReader(client, topic, self._add)

    def start(self) -> None:
        self._reader.start()

    def _add(self, data: bytes) -> None:
        try:
            truth = schemas.decode_truth_topic(data)
        except schemas.SchemaError:
            self.invalid += 1
            return
        if not isinstance(truth, schemas.Truth):
            return  # a frame not sent, or a session's end: nothing to score against
        if truth.session_id in self.sessions and len(self.by_key) < self.cap:
            with self._lock:
                self.by_key[(truth.session_id, truth.rtp_ts)] = truth

    def get(self, sid: str, rtp_ts: int) -> schemas.Truth | None:
        with self._lock:
            return self.by_key.get((sid, rtp_ts))

    def stop(self) -> None:
        self._reader.stop()


@dataclass
class SessionScore:
    session_id: str
    frames: list[DecodedFrame] = field(default_factory=list)
    codec: str | None = None
    error: str | None = None
    reports: int | None = None
    live_errors: int | None = None
    #: The session's own count of its frames due and their fate, once the router said ``end``.
    coverage: accounting.Coverage | None = None


@dataclass
class Summary:
    frames: int
    matched: int
    detected: int
    l2_mean: float
    l2_p50: float
    l2_p95: float
    l2_max: float
    latency_ms_p50: float
    latency_ms_p99: float

    def line(self) -> str:
        rate = self.matched / self.frames if self.frames else 0.0
        return (
            f"frames {self.frames}, matched to truth {self.matched} ({rate:.1%}), "
            f"L2 mean {self.l2_mean:.3f} px p50 {self.l2_p50:.3f} p95 {self.l2_p95:.3f} "
            f"max {self.l2_max:.3f}, render->decoded p50 {self.latency_ms_p50:.1f} ms "
            f"p99 {self.latency_ms_p99:.1f} ms"
        )


def join(
    frames: list[DecodedFrame], truth: TruthIndex, sid: str
) -> list[tuple[DecodedFrame, schemas.Truth]]:
    """Each decoded frame with the truth of exactly that frame (same session, same RTP ts)."""
    out = []
    for f in frames:
        t = truth.get(sid, f.rtp_ts)
        if t is not None:
            out.append((f, t))
    return out


def summarise(frames: int, pairs: list[tuple[DecodedFrame, schemas.Truth]]) -> Summary:
    l2 = [math.dist(f.centroid, (t.x, t.y)) for f, t in pairs if f.centroid is not None]
    lat = [(f.t_recv_ns - t.t_render_ns) / 1e6 for f, t in pairs]
    a = np.array(l2 or [math.nan])
    b = np.array(lat or [math.nan])
    return Summary(
        frames=frames,
        matched=len(pairs),
        detected=len(l2),
        l2_mean=float(a.mean()),
        l2_p50=float(np.percentile(a, 50)),
        l2_p95=float(np.percentile(a, 95)),
        l2_max=float(a.max()),
        latency_ms_p50=float(np.percentile(b, 50)),
        latency_ms_p99=float(np.percentile(b, 99)),
    )


async def watch_via_router(
    router_url: str, sessions: list[str], seconds: float, params: dict[str, object]
) -> list[SessionScore]:
    """Full path: WebTransport to the router, video negotiated through it, reports sent."""
    from carom.signaling import SessionParams
    from carom_client.session import CaromSession, RouterInfo

    scores = [SessionScore(sid) for sid in sessions]
    info = await RouterInfo.fetch(router_url)

    async def one(s: SessionScore) -> None:
        session = CaromSession(
            info, s.session_id, msgspec.convert(params, SessionParams), on_frame=s.frames.append
        )
        try:
            await session.open()
            s.codec = session.codec
            await asyncio.sleep(seconds)
        except Exception as exc:  # reported per session, the others go on
            s.error = f"{type(exc).__name__}: {exc}"
        finally:
            await session.close()  # drains: waits for the router's end (docs/accounting.md)
            s.live_errors = len(session.live_errors)
            s.reports = session.reports_sent
            s.coverage = session.coverage()

    await asyncio.gather(*(one(s) for s in scores))
    return scores


async def watch(
    simulator_url: str,
    sessions: list[str],
    seconds: float,
    params: dict[str, object],
    token: str = "",
) -> list[SessionScore]:
    scores = [SessionScore(sid) for sid in sessions]
    auth = auth_headers(token)

    async def one(s: SessionScore) -> None:
        try:
            client, _ = await open_direct(
                simulator_url, s.session_id, s.frames.append, params, token=token
            )
        except (RuntimeError, OSError) as exc:
            s.error = str(exc)
            return
        s.codec = client.codec
        try:
            await asyncio.sleep(seconds)
        finally:
            await client.close()
            import httpx

            async with httpx.AsyncClient(timeout=10, headers=auth) as http:
                await http.delete(f"{simulator_url}/sessions/{s.session_id}")

    await asyncio.gather(*(one(s) for s in scores))
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carom-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--simulator", default="http://127.0.0.1:8001")
    parser.add_argument(
        "--simulator-token",
        default=os.environ.get("CAROM_SIMULATOR__ACCESS__TOKEN", ""),
        help="the simulator's access token, for --simulator (default: the simulator's own env "
        "var CAROM_SIMULATOR__ACCESS__TOKEN)",
    )
    parser.add_argument(
        "--router", help="go through the router (http URL): WebTransport + reports, as the page"
    )
    parser.add_argument("--pulsar-url", default=os.environ.get("PULSAR_URL", PulsarSettings().url))
    parser.add_argument("--truth-topic", default=TopicNames().truth)
    parser.add_argument("-n", "--sessions", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--gravity", type=float)
    parser.add_argument("--cor", type=float)
    parser.add_argument("--background", help="plain, texture, warm, or a clip the simulator knows")
    parser.add_argument("--bitrate", type=int, help="target bits/s (0: the encoder's own)")
    parser.add_argument("--host-address", default="127.0.0.1", help="ICE host address")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_host_addresses([args.host_address])
    params: dict[str, object] = {"fps": args.fps}
    if args.gravity is not None:
        params["gravity"] = args.gravity
    if args.cor is not None:
        params["cor"] = args.cor
    for name in ("background", "bitrate"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    run = uuid.uuid4().hex[:6]
    sessions = [f"probe-{run}-{i}" for i in range(args.sessions)]
    client = make_client(PulsarSettings(url=args.pulsar_url), quiet_logger(100))
    try:
        truth = TruthIndex(client, args.truth_topic, set(sessions), cap=2_000_000)
    except pulsar.PulsarException as exc:
        print(f"carom-probe: cannot reach Pulsar at {args.pulsar_url}: {exc}", file=sys.stderr)
        return 1
    truth.start()
    try:
        if args.router:
            scores = asyncio.run(watch_via_router(args.router, sessions, args.duration, params))
        else:
            scores = asyncio.run(
                watch(args.simulator, sessions, args.duration, params, args.simulator_token)
            )
        time.sleep(0.5)  # the last truth messages
    finally:
        truth.stop()
        client.close()
    failed = [s for s in scores if s.error]
    for s in failed:
        print(f"{s.session_id}: FAILED: {s.error}")
    frames = 0
    pairs: list[tuple[DecodedFrame, schemas.Truth]] = []
    for s in scores:
        if s.error:
            continue
        mine = join(s.frames, truth, s.session_id)
        extra = f", reports sent {s.reports}" if s.reports is not None else ""
        if s.coverage is not None:
            extra += f"; live results: {s.coverage.line()}"
        print(f"{s.session_id} [{s.codec}]: {summarise(len(s.frames), mine).line()}{extra}")
        frames += len(s.frames)
        pairs += mine
    if len([s for s in scores if not s.error]) > 1:
        print(f"overall: {summarise(frames, pairs).line()}")
    return 1 if failed or not frames else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
