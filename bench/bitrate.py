"""Bitrate sweep (issue 17, item 4): what a session's target bitrate does to the bits actually
sent, to the tracking error and to the latency, measured instead of assumed.

Usage::

    flock /tmp/carom-heavy.lock .venv/bin/python bench/bitrate.py \\
        [--sizes 640x480,1280x720] [--fps 30] [--backgrounds plain,texture] \\
        [--encoders service] [--steps 0,100k,200k,300k,500k,1M,2M,3M,5M] \\
        [--settle 1] [--seconds 3]

One configuration (encoder, size, frame rate, background) is one session, in this process: a
real ``SessionManager`` streams to a real aiortc ``VideoClient`` over loopback, which decodes
every frame and finds the ball in it with the page's algorithm (``carom_client.centroid``), as
tests/simulator/test_control.py does. The session sweeps its target live, one
``control(bitrate=...)`` per step, and every step is a phase of its own. The first ``--settle``
seconds after a change are discarded (the change re-creates the encoder: a keyframe, and x264's
rate control starting over); the next ``--seconds`` are measured:

- *sent*: the sender's RTP payload counter (``RTCRtpSender.__octet_count``, what the phase's
  ``PhaseSummary.bytes_sent`` is made of) over the measured window; *phase*: the
  ``PhaseSummary``'s own figure over the whole phase, settle and keyframe included;
- *x264*: the bit rate the encoder's libx264 context was made with at the window's end: what the
  target became inside aiortc, read where x264 reads it;
- frames due (every frame index whose due time falls in the window, sent or skipped), decoded
  (joined to its truth by RTP timestamp), detected (a centroid was found);
- L2 error of every detected frame against its truth (px), mean / p50 / p99 / max;
- render -> decoded latency: truth's ``t_render_ns`` (frame handed to the encoder) to the
  decoded frame's ``t_recv_ns``; both are ``time.time_ns()`` of this one process.

Encoders (``--encoders``):

- ``service``: the simulator's own (``carom_simulator.encoder.install`` with the configured
  preset and threads, as ``app.py`` does at start). The track sets the session's target
  (``pinned_bitrate``) and frame rate (``fps``) on it before each frame, so the target holds
  whatever REMB says and x264's rate control runs at the session's rate.
- ``tuned``: the same class (``carom_simulator.encoder.TunedH264Encoder``), preset and threads,
  under aiortc's class name ``H264Encoder`` and installed by this bench instead of by
  ``install``; the track drives it the same way.
- ``aiortc``: aiortc's stock H.264 encoder (x264 preset medium, threads auto), which the tests
  run with; the track writes the session's target into its private target field.

Step ``0`` is aiortc's default: 1 Mbps, then whatever the receiver's REMB says, clamped to
0.5-3 Mbps; every REMB change of over 10% re-creates the encoder (*resets*: counted for the
``service`` and ``tuned`` encoders, which count their contexts; each one is a keyframe).

What the runs showed (2026-12-03), beside the trend itself: before the target was pinned on the
encoder, REMB still re-created it now and then with a target in force (in pairs, 2 or 4 in 5 of
32 windows, with the sweep's worst p99 latencies), and before x264 was given the session's frame
rate it was told 30 fps whatever the rate, so a 60 fps session sent 1.97-1.99 x its target up to
1 Mbps (``bitrate-60fps.json``, ``tuned``, measured before that fix). In ``bitrate.json``
(``service``, both in force) no window with a target re-created its encoder.

The simulator, the encoder, the decoder and the centroid share this process and the machine's
cores: per step the process's CPU and the rest of the machine's are recorded, and the load
average at start and end. Results: ``bench/results/bitrate.json`` (machine, config, one row
per step), ``bitrate.md`` (the table) and ``bitrate.png`` (L2 and latency against the bitrate
sent); ``--name`` for other file names, ``--replot`` redraws the plot and table from the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiortc.rtcrtpsender
import numpy as np
from aiortc.codecs import get_encoder as aiortc_get_encoder

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import e2e  # noqa: E402
from carom.schemas import PhaseSummary  # noqa: E402
from carom.signaling import OfferRequest, SessionControl, SessionParams  # noqa: E402
from carom_client.video import DecodedFrame, VideoClient  # noqa: E402
from carom_runtime.ice import set_host_addresses  # noqa: E402
from carom_simulator import encoder  # noqa: E402
from carom_simulator.config import SimulatorSettings  # noqa: E402
from carom_simulator.origin import Stamped  # noqa: E402
from carom_simulator.sessions import SessionManager  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ENCODERS = ("service", "tuned", "aiortc")
#: aiortc 1.16's clamp on the H.264 encoder's target (``aiortc.codecs.h264``).
AIORTC_CLAMP = (500_000, 3_000_000)
#: A target is *met* when the bitrate sent is within this factor of it; *over* past it.
MET = 1.25
_OCTETS = "_RTCRtpSender__octet_count"
_ENCODER = "_RTCRtpSender__encoder"


@dataclass(frozen=True, slots=True)
class Config:
    """One session of the sweep."""

    encoder: str
    width: int
    height: int
    fps: float
    background: str

    @property
    def label(self) -> str:
        return f"{self.encoder} {self.width}x{self.height} {self.fps:g}fps {self.background}"


@dataclass(frozen=True, slots=True)
class Window:
    """What was read around one step's measured window."""

    phase: int
    target_bps: int
    t0_ns: int
    t1_ns: int
    octets: int
    x264_bit_rate: int | None
    #: Encoder contexts created in the window (keyframes the encoder chose itself); None: the
    #: encoder does not count them.
    encoder_resets: int | None
    cpu_process_s: float
    cpu_machine_s: float


def parse_rate(text: str) -> int:
    """``300k`` -> 300000, ``1.5M`` -> 1500000, ``0`` -> 0 (bits/s)."""
    text = text.strip()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    return round(float(number) * scale)


def parse_size(text: str) -> tuple[int, int]:
    """``640x480`` -> (640, 480)."""
    w, h = text.lower().split("x")
    return int(w), int(h)


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def verdict(target_bps: int, sent_bps: float) -> str:
    """Did the target hold? ``over`` means the sender sent well past it: the target was not in
    force. ``under`` is legitimate: a ball on a plain background needs fewer bits than most
    targets, and x264 does not pad."""
    if target_bps == 0:
        return "default"
    if sent_bps > MET * target_bps:
        return "over"
    if sent_bps < target_bps / MET:
        return "under"
    return "met"


def step_row(
    records: Sequence[Stamped], frames: Sequence[DecodedFrame], w: Window
) -> dict[str, Any]:
    """One step's figures: the phase's frames due in the window, joined to what was decoded."""
    seconds = (w.t1_ns - w.t0_ns) / 1e9
    decoded = {f.rtp_ts: f for f in frames}
    due = [
        s for s in records if s.truth.phase == w.phase and w.t0_ns <= s.truth.t_render_ns < w.t1_ns
    ]
    sent = [s for s in due if s.truth.sent]
    l2: list[float] = []
    latency_ms: list[float] = []
    n_decoded = 0
    for s in sent:
        f = decoded.get(s.rtp_ts)
        if f is None:
            continue
        n_decoded += 1
        latency_ms.append((f.t_recv_ns - s.truth.t_render_ns) / 1e6)
        if f.centroid is not None:
            l2.append(math.hypot(f.centroid[0] - s.truth.x, f.centroid[1] - s.truth.y))
    sent_bps = 8 * w.octets / seconds if seconds > 0 else 0.0
    return {
        "target_bps": w.target_bps,
        "phase": w.phase,
        "seconds": round(seconds, 3),
        "sent_kbps": round(sent_bps / 1e3, 1),
        "verdict": verdict(w.target_bps, sent_bps),
        "x264_bit_rate": w.x264_bit_rate,
        "encoder_resets": w.encoder_resets,
        "bytes_per_frame": round(w.octets / len(sent)) if sent else None,
        "frames_due": len(due),
        "frames_sent": len(sent),
        "frames_decoded": n_decoded,
        "decoded_share": round(n_decoded / len(due), 4) if due else None,
        "frames_detected": len(l2),
        "detection_rate": round(len(l2) / n_decoded, 4) if n_decoded else None,
        "l2_mean_px": _round(float(np.mean(l2)) if l2 else None, 3),
        "l2_p50_px": _round(percentile(l2, 50), 3),
        "l2_p99_px": _round(percentile(l2, 99), 3),
        "l2_max_px": _round(max(l2) if l2 else None, 3),
        "latency_p50_ms": _round(percentile(latency_ms, 50), 2),
        "latency_p99_ms": _round(percentile(latency_ms, 99), 2),
        "cpu_process_cores": round(w.cpu_process_s / seconds, 3) if seconds > 0 else None,
        "cpu_others_cores": (
            round(max(0.0, w.cpu_machine_s - w.cpu_process_s) / seconds, 3) if seconds > 0 else None
        ),
    }


def phase_kbps(phases: Sequence[PhaseSummary]) -> dict[int, float]:
    """Bitrate sent over each whole phase (settle and keyframe included), from ``SessionEnd``."""
    out = {}
    for p in phases:
        seconds = (p.t_end_ns - p.t_start_ns) / 1e9
        if seconds > 0:
            out[p.phase] = round(8 * p.bytes_sent / seconds / 1e3, 1)
    return out


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def _use_encoder(name: str, settings: SimulatorSettings) -> None:
    """Process-wide, as the service does at start: aiortc looks its encoder up per sender."""
    if name == "service":
        encoder.install(settings.encoder_preset, settings.encoder_threads)
    elif name == "tuned":

        class H264Encoder(encoder.TunedH264Encoder):  # the name: see the module docstring
            preset, threads = settings.encoder_preset, settings.encoder_threads

        def get_encoder(codec: Any) -> Any:
            if codec.mimeType.lower() == "video/h264":
                return H264Encoder()
            return aiortc_get_encoder(codec)

        setattr(aiortc.rtcrtpsender, "get_encoder", get_encoder)  # noqa: B010
    else:
        encoder.uninstall()


def _opener(name: str) -> Any:
    """Background sources for ``background != plain`` (``carom_simulator.background``)."""
    from carom_simulator.background import open_background

    return open_background(name, None)


async def run_config(
    cfg: Config, steps: Sequence[int], settle: float, seconds: float, seed: int
) -> list[dict[str, Any]]:
    settings = SimulatorSettings()
    _use_encoder(cfg.encoder, settings)
    executor = ThreadPoolExecutor(2, thread_name_prefix="carom-frames")
    records: list[Stamped] = []
    ended: list[list[PhaseSummary]] = []
    manager = SessionManager(
        settings,
        lambda _sid, st: records.append(st),
        executor,
        on_end=lambda _sid, _due, _t, _reason, phases: ended.append(phases),
        backgrounds=_opener,
    )
    frames: list[DecodedFrame] = []
    client = VideoClient(frames.append)
    sid = "bitrate"
    params = SessionParams(
        fps=cfg.fps, width=cfg.width, height=cfg.height, background=cfg.background, seed=seed
    )
    windows: list[Window] = []
    try:
        answer = await manager.create(
            OfferRequest(session_id=sid, sdp=await client.offer(), params=params)
        )
        await client.accept(answer.sdp)
        deadline = time.monotonic() + 15
        while not frames:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cfg.label}: no frame decoded in 15 s")
            await asyncio.sleep(0.05)
        sender = manager._sessions[sid].pc.getTransceivers()[0].sender
        phase = 0
        for i, target in enumerate(steps):
            if i > 0 or target != 0:  # phase 0 runs at the encoder's own target
                phase = (await manager.control(sid, SessionControl(bitrate=target))).phase
            await asyncio.sleep(settle)
            t0, o0 = time.time_ns(), getattr(sender, _OCTETS)
            c0, m0 = time.process_time(), e2e.machine_busy_seconds()
            enc0 = getattr(sender, _ENCODER)
            n0 = getattr(enc0, "contexts", None)
            await asyncio.sleep(seconds)
            t1, o1 = time.time_ns(), getattr(sender, _OCTETS)
            c1, m1 = time.process_time(), e2e.machine_busy_seconds()
            enc = getattr(sender, _ENCODER)
            n1 = getattr(enc, "contexts", None)
            resets = n1 - n0 if enc is enc0 and n0 is not None and n1 is not None else None
            codec = getattr(enc, "codec", None)
            x264 = int(codec.bit_rate) if codec is not None else None
            windows.append(Window(phase, target, t0, t1, o1 - o0, x264, resets, c1 - c0, m1 - m0))
        await asyncio.sleep(0.5)  # the last window's frames are decoded
        await manager.close(sid)
    finally:
        await manager.close_all()
        await client.close()
        executor.shutdown(wait=True)
    whole = phase_kbps(ended[-1]) if ended else {}
    rows = []
    for w in windows:
        row = {**asdict(cfg), **step_row(records, frames, w)}
        row["phase_sent_kbps"] = whole.get(w.phase)
        rows.append(row)
    return rows


def _fmt(v: object, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results as a markdown table, one line per step."""
    lines = [
        "| config | target kbps | sent kbps | verdict | x264 kbps | resets | B/frame | decoded/due "
        "| detected | L2 mean | L2 p50 | L2 p99 | lat p50 ms | lat p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = f"{r['encoder']} {r['width']}x{r['height']}@{r['fps']:g} {r['background']}"
        x264 = r["x264_bit_rate"]
        lines.append(
            f"| {cfg} | {r['target_bps'] // 1000 if r['target_bps'] else 'default'} "
            f"| {r['sent_kbps']:.0f} | {r['verdict']} "
            f"| {_fmt(None if x264 is None else x264 // 1000)} | {_fmt(r['encoder_resets'])} "
            f"| {_fmt(r['bytes_per_frame'])} "
            f"| {r['frames_decoded']}/{r['frames_due']} | {_fmt(r['detection_rate'], '.1%')} "
            f"| {_fmt(r['l2_mean_px'], '.2f')} | {_fmt(r['l2_p50_px'], '.2f')} "
            f"| {_fmt(r['l2_p99_px'], '.2f')} | {_fmt(r['latency_p50_ms'], '.1f')} "
            f"| {_fmt(r['latency_p99_ms'], '.1f')} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """L2 p50/p99 and latency p50/p99 against the bitrate sent: one colour per size, frame rate
    and background, one marker per encoder; the steps joined in target order (the default step,
    REMB's rate, is a star of its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_l2, ax_lat) = plt.subplots(1, 2, figsize=(13, 5.8))
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        scene = f"{r['width']}x{r['height']}@{r['fps']:g} {r['background']}"
        groups.setdefault((r["encoder"], scene), []).append(r)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    scenes = sorted({scene for _, scene in groups})
    markers = {"service": "x", "tuned": "o", "aiortc": "s"}
    for (enc, scene), rs in groups.items():
        c = colours[scenes.index(scene) % len(colours)]
        steps = sorted((r for r in rs if r["target_bps"]), key=lambda r: r["target_bps"])
        default = [r for r in rs if not r["target_bps"]]
        for ax, field in ((ax_l2, "l2"), (ax_lat, "latency")):
            unit = "px" if field == "l2" else "ms"
            for q, style in (("p50", "-"), ("p99", "--")):
                key = f"{field}_{q}_{unit}"
                ax.plot([r["sent_kbps"] for r in steps], [r[key] for r in steps], style,
                        marker=markers.get(enc, "o"), ms=4, color=c,
                        alpha=0.45 if enc == "service" else 1.0,
                        label=f"{enc} {scene}" if ax is ax_l2 and q == "p50" else None)  # fmt: skip
                ax.plot([r["sent_kbps"] for r in default], [r[key] for r in default], "*",
                        ms=9, color=c, alpha=0.45 if enc == "service" else 1.0)  # fmt: skip
    for ax, label in ((ax_l2, "L2 error vs truth (px)"), (ax_lat, "render -> decoded (ms)")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^2, 3x10^2, ... overlapped
        ax.set_xlabel("bitrate sent (kbit/s, measured)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_l2.set_yscale("log")
    fig.legend(loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        f"{title}\nsolid: p50, dashed: p99; steps joined in target order; star: the default "
        "(REMB); service: faded x",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: Mapping[str, Any], directory: Path, name: str) -> str:
    """``<name>.png`` and ``<name>.md`` from a result; the markdown, to print."""
    plot(result["rows"], directory / f"{name}.png", _title(result))
    c = result["config"]
    md = "\n".join([
        f"# {_title(result)}",
        "",
        "One session per configuration, its target changed live at every step; a step is "
        f"{c['settle_s']:g} s of settling (discarded), then {c['seconds']:g} s measured. "
        "*sent*: RTP payload over the window; *over*: more than 1.25 x the target; "
        "*x264*: the bit rate x264 ran with; *resets*: encoders re-created in the window; "
        "latency: render -> decoded. Details: `bench/bitrate.py`, figures: "
        f"`{name}.json`, plot: `{name}.png`.",
        "",
        table(result["rows"]),
        "",
    ])  # fmt: skip
    (directory / f"{name}.md").write_text(md)
    return md


def _title(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    return (
        f"Carom bitrate sweep, {result['when']}: one process (simulator + aiortc client), "
        f"{m['nproc']} cores, load {m['load_avg_1m_at_start']} -> {m['load_avg_1m_at_end']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="640x480,1280x720")
    parser.add_argument("--fps", default="30")
    parser.add_argument("--backgrounds", default="plain,texture")
    parser.add_argument("--encoders", default="service")
    parser.add_argument("--steps", default="0,100k,200k,300k,500k,1M,2M,3M,5M")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bitrate", help="results file names (.json, .png)")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw <name>.png from <name>.json"
    )
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((args.results_dir / f"{args.name}.json").read_text())
        print(write_outputs(saved, args.results_dir, args.name))
        return 0
    steps = [parse_rate(s) for s in args.steps.split(",")]
    encoders = args.encoders.split(",")
    if unknown := set(encoders) - set(ENCODERS):
        parser.error(f"unknown encoder(s) {sorted(unknown)}: choose from {ENCODERS}")
    configs = [
        Config(enc, *parse_size(size), float(fps), bg)
        for enc in encoders
        for size in args.sizes.split(",")
        for fps in args.fps.split(",")
        for bg in args.backgrounds.split(",")
    ]
    if any(c.background != "plain" for c in configs):
        from carom_simulator.background import resolve_background

        for bg in {c.background for c in configs} - {"plain"}:
            resolve_background(bg, None)  # generate a built-in clip now, not in a window
    set_host_addresses(["127.0.0.1"])
    info = e2e.machine()
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for cfg in configs:
        print(f"{cfg.label}: {len(steps)} steps", flush=True)
        got = asyncio.run(run_config(cfg, steps, args.settle, args.seconds, args.seed))
        for r in got:
            print(f"  {r['target_bps']:>8} -> {r['sent_kbps']:8.1f} kbps ({r['verdict']}), "
                  f"L2 p50 {_fmt(r['l2_p50_px'], '.2f')} p99 {_fmt(r['l2_p99_px'], '.2f')} px, "
                  f"latency p50 {_fmt(r['latency_p50_ms'], '.1f')} "
                  f"p99 {_fmt(r['latency_p99_ms'], '.1f')} ms", flush=True)  # fmt: skip
        rows += got
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    settings = SimulatorSettings()
    result = {
        "bench": "bitrate",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info,
        "wall_seconds": round(time.monotonic() - started, 1),
        "config": {
            "steps_bps": steps,
            "settle_s": args.settle,
            "seconds": args.seconds,
            "seed": args.seed,
            "service_encoder": {
                "preset": settings.encoder_preset,
                "threads": settings.encoder_threads,
            },
            "aiortc_clamp_bps": list(AIORTC_CLAMP),
            "configs": [asdict(c) for c in configs],
        },
        "rows": rows,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_outputs(result, args.results_dir, args.name))
    print(f"\n{result['wall_seconds']} s; load average {info['load_avg_1m_at_start']} at start, "
          f"{info['load_avg_1m_at_end']} at end")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
