"""bench/capacity.py's arithmetic: per-process usage, per-session cost, the fits, the markdown."""

from __future__ import annotations

import os
from typing import Any

from bench import capacity
from bench.capacity import Proc, Usage
from carom.schemas import PhaseSummary, SessionEnd
from carom_tracker import records


def test_usage_counts_processes_that_appear_from_zero() -> None:
    first = {"router": {10: Proc(1.0, 1024, 512, 100)}}
    last = {
        "router": {10: Proc(3.0, 2048, 1024, 1100)},
        "chromium": {20: Proc(0.5, 1024, 1024, 0), 21: Proc(0.5, 1024, 1024, 0)},
    }
    u = capacity.usage(first, last, 2.0)
    assert u["router"] == Usage(cores=1.0, write_bps=500.0, rss_mb=2.0, pss_mb=1.0)
    assert u["chromium"].cores == 0.5 and u["chromium"].pss_mb == 2.0


def test_per_session_takes_the_idle_cost_out() -> None:
    idle = {"router": Usage(0.01, 0.0, 50.0, 50.0)}
    loaded = {"router": Usage(0.21, 400.0, 54.0, 52.0), "chromium": Usage(0.4, 0.0, 800.0, 600.0)}
    ps = capacity.per_session(idle, loaded, 4)
    assert ps["router"] == {"cores": 0.05, "write_bps": 100.0, "rss_mb": 1.0, "pss_mb": 0.5}
    assert ps["chromium"]["cores"] == 0.1  # absent at idle: from zero


def test_fits() -> None:
    assert capacity.fit_through_origin([]) is None
    assert capacity.fit_through_origin([(2, 0.2), (4, 0.4)]) == 0.1
    line = capacity.fit_line([(1, 0.3), (2, 0.5)])
    assert line is not None and abs(line[0] - 0.2) < 1e-12 and abs(line[1] - 0.1) < 1e-12
    assert capacity.fit_line([(1, 0.3), (1, 0.5)]) is None


def _phase(sent: int, t0: int, t1: int) -> PhaseSummary:
    return PhaseSummary(phase=0, state="streaming", first_frame=0, frames_due=30,
                        frames_sent=30, t_start_ns=t0, t_end_ns=t1, fps=30.0, width=640,
                        height=480, bitrate=0, keyframe_interval=0, gravity=0.0, vx=1.0,
                        vy=1.0, cor=1.0, background="plain", bytes_sent=sent,
                        warning="")  # fmt: skip


def test_video_bps_over_each_sessions_phases() -> None:
    end = SessionEnd(session_id="a", frames_due=30, t_end_ns=2_000_000_000, reason="deleted",
                     phases=[_phase(31_250, 0, 1_000_000_000)])  # fmt: skip
    assert capacity.video_bps([records.SessionRecords(ends=[end])]) == 250_000.0
    assert capacity.video_bps([records.SessionRecords()]) is None


def _run(clients: str, fps: float, n: int, cores: float) -> dict[str, Any]:
    idle = {"router": Usage(0.01, 0.0, 50.0, 50.0)}
    loaded = {"router": Usage(0.01 + cores * n, 0.0, 50.0, 50.0),
              "router-fanout": Usage(0.002 * n, 0.0, 50.0, 50.0)}  # fmt: skip
    if clients == "chromium":
        loaded["chromium"] = Usage(0.1 + 0.2 * n, 0.0, 0.0, 300.0 + 100.0 * n)
    topics = {k: {"msg_in": fps * n, "bytes_in": 300.0 * fps * n, "msg_out": fps * n,
                  "bytes_out": 300.0 * fps * n} for k in capacity.TOPICS}  # fmt: skip
    return {
        "clients": clients, "fps": fps, "sessions": n, "ok": True, "kept": 1.0,
        "skipped_by_simulator": 0, "failures": [], "other_cores": 0.1,
        "idle": {k: vars(v) for k, v in idle.items()},
        "loaded": {k: vars(v) for k, v in loaded.items()},
        "per_session": capacity.per_session(idle, loaded, n), "topics": topics,
        "topics_per_session": {k: {m: v / n for m, v in t.items()} for k, t in topics.items()},
        "video_bps_per_session": 250_000.0,
    }  # fmt: skip


def test_fits_and_markdown() -> None:
    runs = [_run("python", 30.0, 2, 0.05), _run("python", 30.0, 4, 0.05),
            _run("chromium", 30.0, 1, 0.07), _run("chromium", 30.0, 2, 0.07)]  # fmt: skip
    fits = capacity.fits(runs)
    assert fits["30"]["per_session"]["router"]["cores"] == 0.05
    assert fits["30"]["topics_per_session"]["truth"]["msg_in"] == 30.0
    # 0.002 cores per session reading 30 error msg/s per session: 0.0667 per 1,000 msg/s
    assert fits["30"]["fanout_cores_per_1k_error_msgs"] == round(0.002 / 30 * 1000, 4)
    pages = capacity.page_fits(runs)
    assert pages["30"]["chromium"]["cores"] == {"per_page": 0.2, "browser": 0.1}
    assert pages["30"]["chromium"]["pss_mb"] == {"per_page": 100.0, "browser": 300.0}
    result = {
        "when": "now", "command": "bench/capacity.py", "broker": "Apache Pulsar 4.0.7",
        "idle_s": 8.0, "settle_s": 3.0, "duration_s": 20.0, "runs": runs, "fits": fits,
        "page_fits": pages,
        "machine": {"nproc": os.cpu_count(), "cpu_model": "x", "arch": "x86_64",
                    "python": "3.11", "load_avg_1m_at_start": 0.5},
    }  # fmt: skip
    md = capacity.markdown(result)
    assert "| 30 | 2, 4 | router | **0.0500** |" in md
    assert "0.200 cores per page + 0.100 for the browser" in md
