"""bench/e2e.py's arithmetic: which frames count, the kept share, and its markdown."""

from __future__ import annotations

import os

from bench import e2e
from carom_tracker import csvrow


def _row(sid: str, n: int, status: str, render_ms: float) -> csvrow.Row:
    t = int(render_ms * 1e6)
    cells = dict.fromkeys(csvrow.COLUMNS, "")
    cells.update(session_id=sid, frame=str(n), rtp_ts=str(3000 * n), status=status,
                 truth_x="1.0", truth_y="2.0", t_render_ns=str(t))  # fmt: skip
    if status == "ok":
        cells.update(x="1.0", y="2.1", l2_px="0.1", t_router_recv_ns=str(t + 20_000_000),
                     end_to_end_ms="20.0")  # fmt: skip
    return csvrow.from_row(cells)


def test_every_frame_due_counts_the_tail_and_the_frames_not_sent() -> None:
    rows = [_row("a", i, "ok", 33.3 * i) for i in range(10)]
    rows[4] = _row("a", 4, "missed", 33.3 * 4)
    rows[6] = _row("a", 6, "not_sent", 33.3 * 6)  # skipped by the simulator: due, lost
    rows += [_row("a", i, "missed", 33.3 * i) for i in range(10, 14)]  # the tail counts too
    rows += [_row("b", i, "missed", 33.3 * i) for i in range(5)]  # a session that saw nothing
    del rows[2]  # frame 2 of "a" has no row at all: still due
    s = e2e.summarise(rows)
    assert (s["frames"], s["ok"], s["missed"], s["skipped_by_simulator"], s["no_row"]) == (
        19,
        7,
        10,
        1,
        1,
    )
    assert s["kept"] == round(7 / 19, 5) and s["rendered"] == 18
    assert abs(s["l2_mean_px"] - 0.1) < 1e-9
    assert s["latency_ms"]["end_to_end_ms"]["p50"] == 20.0


def test_markdown_names_the_largest_kept_count() -> None:
    run = {
        "clients": "python", "fps": 30.0, "sessions": 4, "seconds": 20.0, "failures": [],
        **e2e.summarise([_row("a", i, "ok", 33.3 * i) for i in range(5)]),
        "cpu_cores": {"simulator": 0.5, "router": 0.2, "tracker": 0.1, "broker": 0.3,
                      "clients": 0.6, "other": 0.0},
    }  # fmt: skip
    result = {
        "when": "now", "clients": "python", "seconds": 20.0, "runs": [run],
        "largest_kept": {"30": 4, "60": 0}, "limit_found": {"30": False, "60": True},
        "machine": {"nproc": 2, "cpu_model": "x", "arch": "x86_64", "python": "3.11",
                    "load_avg_1m_at_start": 0.5},
    }  # fmt: skip
    md = e2e.markdown(result)
    assert "| 30 | 4 | 5 | 0 | 100.00% | 0.100 | 20.0 / 20.0 |" in md, md
    assert "0.50 / 0.20 / 0.10 / 0.30 / 0.60 / 0.00 |" in md
    assert "- 30 fps: 4 (every count tried kept them)" in md and "- 60 fps: none\n" in md


def test_cpu_probe_sees_this_process() -> None:
    probe = e2e.CpuProbe({})
    probe.start()
    sum(i * i for i in range(2_000_000))  # some CPU
    cpu = probe.stop()
    assert cpu["clients"] is not None and cpu["clients"] > 0
    assert os.getpid() in e2e.descendants(os.getppid())
