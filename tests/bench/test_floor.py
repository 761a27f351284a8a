"""bench/floor.py's pure parts: percentiles, ratios, goals, report decoding, the bare summary and
its markdown. No timing is asserted."""

from __future__ import annotations

import math
import struct
from typing import Any

from bench import floor


def test_percentile_and_ratio() -> None:
    assert floor.percentile([], 99) is None
    assert floor.percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert floor.p50_p99([4.0] * 10) == {"p50": 4.0, "p99": 4.0, "n": 10}
    assert floor.ratio(30.0, 20.0) == 1.5
    assert floor.ratio(None, 20.0) is None
    assert floor.ratio(30.0, 0.0) is None


def _lat(p50: float | None, p99: float | None) -> dict[str, float | int | None]:
    return {"p50": p50, "p99": p99, "n": 1}


def test_goals_compare_carom_to_the_bare_path() -> None:
    bare = {"latency_ms": {"render_to_server_ms": _lat(10.0, 20.0)}, "kept": 1.0}
    hops = {"end_to_end_ms": _lat(12.0, 29.0), "render_to_computed_ms": _lat(17.0, 39.0)}
    carom = {"latency_ms": hops, "kept": 0.9991}
    g = floor.goals(bare, carom)
    assert g["router_p50_ratio"] == 1.2 and g["router_p99_ratio"] == 1.45
    assert g["router_p99_bound"] == 30.0 and g["computed_p99_bound"] == 38.0
    assert g["router_p99_ok"] is True and g["computed_p99_ok"] is False and g["kept_ok"] is True
    hops["end_to_end_ms"] = _lat(None, None)
    assert floor.goals(bare, carom)["router_p99_ok"] is None


def test_decode_report_reads_the_pages_36_bytes() -> None:
    data = struct.pack(">BBHIIffdd", 1, 1, 1, 7, 123456, 10.5, 20.25, 1000.0, 1002.5)
    r = floor.decode_report(data, 99)
    assert r is not None and (r.rtp, r.x, r.y, r.t_recv_ns) == (123456, 10.5, 20.25, 99)
    none = struct.pack(">BBHIIffdd", 1, 1, 0, 7, 5, math.nan, math.nan, 1.0, 2.0)
    r = floor.decode_report(none, 1)
    assert r is not None and r.x is None
    assert floor.decode_report(data[:-1], 1) is None
    assert floor.decode_report(b"\x02" + data[1:], 1) is None


def test_rtp_origin_is_the_draw_that_maps_reports_onto_sent_pts() -> None:
    origin = 2**32 - 1000  # wraps
    pts = {0, 1500, 3000}
    rtps = [(origin + p) % 2**32 for p in pts]
    assert floor.rtp_origin([17, origin, 99], rtps, pts) == origin
    assert floor.rtp_origin([17], rtps, pts) is None


def test_bare_summary_counts_skipped_and_unreported_frames_as_due() -> None:
    origin = 1000
    sent = {
        1500 * f: floor.Sent(f, 1_000_000_000 + f * 16_666_667, 100.0, 50.0) for f in (0, 1, 3, 4)
    }  # frame 2 skipped as late
    reports = []
    for f in (0, 1, 3):  # frame 4 sent, never reported: after the last report, not due
        s = sent[1500 * f]
        t_ms = s.t_render_ns / 1e6
        reports.append(floor.Report(s.t_render_ns + 12_000_000, origin + 1500 * f, 100.0, 53.0,
                                    t_ms + 9.0, t_ms + 11.0))  # fmt: skip
    reports.append(reports[0])  # a duplicate counts once
    out = floor.bare_summary(sent, reports, origin, skipped=1)
    assert (out["frames"], out["ok"], out["kept"]) == (4, 3, 0.75)
    assert out["l2_mean_px"] == 3.0
    lat = out["latency_ms"]
    assert lat["render_to_server_ms"]["n"] == 3
    assert abs(lat["render_to_server_ms"]["p50"] - 12.0) < 1e-6
    assert abs(lat["analysed_to_server_ms"]["p99"] - 1.0) < 1e-3
    assert out["worst_seconds"][0]["second"] == 0
    assert floor.bare_summary(sent, reports, None, skipped=1)["ok"] == 0


def test_worst_seconds_rank_windows_by_the_key() -> None:
    s = 1_000_000_000
    timeline = [(0, {"a": 1.0, "b": 5.0}), (s + 1, {"a": 9.0, "b": 2.0}), (2 * s, {"a": 3.0})]
    w = floor.worst_seconds(timeline, "a", top=2)
    assert [x["second"] for x in w] == [1, 2] and w[0]["b"] == 2.0
    assert floor.worst_seconds([], "a") == []


def test_markdown_has_a_row_per_fps() -> None:
    bare = {
        "latency_ms": {h: _lat(10.0, 20.0) for h in floor.BARE_HOPS},
        "kept": 1.0, "worst_seconds": [{"second": 0, "render_to_server_ms": 30.0}],
        "skipped_late": 0, "webrtc": {"jitter_buffer_ms": 7.5},
    }  # fmt: skip
    carom = {
        "latency_ms": {h: _lat(11.0, 25.0) for h in (*floor.HOPS, "analysed_to_router_ms")},
        "kept": 1.0, "worst_seconds": [], "simulator": {"frames_late_dropped": 0}, "webrtc": {},
    }  # fmt: skip
    result = {
        "when": "now", "seconds": 20.0,
        "machine": {"nproc": 2, "cpu_model": "x", "python": "3.11", "load_avg_1m_at_start": 0.1},
        "runs": [{"fps": 60.0, "bare": bare, "carom": carom, "goals": floor.goals(bare, carom)}],
    }  # fmt: skip
    md = floor.markdown(result)
    assert "| 60 | 10.0 / 20.0 | 11.0 / 25.0 | 1.10x / 1.25x |" in md
    assert "jitter_buffer_ms" in md
    hop = {"bare_exclusive": {"p50": 0.8, "p99": 2.0}, "bare_key_shared": {"p50": 1.6, "p99": 4.0},
           "carom": {"p50": 2.4, "p99": 9.0}}  # fmt: skip
    run = {"fps": 60.0, "bare": bare, "carom": carom, "goals": floor.goals(bare, carom),
           "pulsar": hop, "pulsar_goals": floor.pulsar_goals(hop)}  # fmt: skip
    md = floor.markdown({**result, "runs": [run]})
    assert "| 60 | 0.8 / 2.0 | 1.6 / 4.0 | 2.4 / 9.0 | 1.50x / 2.25x | NO / NO |" in md, md


def test_carom_pulsar_hop_is_published_to_computed_of_joined_rows() -> None:
    class Row:
        def __init__(self, status: str, published: int | None, computed: int) -> None:
            self.status, self.t_published_ns, self.t_computed_ns = status, published, computed

    rows = [Row("ok", 1_000_000, 3_500_000), Row("not_detected", 0, 1_000_000),
            Row("missed", None, 9_000_000), Row("not_sent", None, 5)]  # fmt: skip
    assert floor.published_to_computed(rows) == [2.5, 1.0]
    g = floor.pulsar_goals({"carom": {"p50": 1.9, "p99": 8.0},
                            "bare_key_shared": {"p50": 1.0, "p99": 4.0},
                            "bare_exclusive": {"p50": 0.5, "p99": 1.0}})  # fmt: skip
    assert (g["p50_ok"], g["p99_ok"], g["p50_ratio_exclusive"]) == (True, True, 3.8)


def test_find_ball_is_taken_from_the_page() -> None:
    js = floor.find_ball_js(floor.PAGE.read_text())
    assert js.startswith("async function findBall(") and "copyTo" in js
    assert "findBall" in floor.bare_page(js)


def test_jitter_series_is_per_interval() -> None:
    def s(delay: float, target: float, n: int) -> dict[str, object]:
        return {"jitter_buffer_delay_s": delay, "jitter_buffer_target_s": target,
                "jitter_buffer_emitted": n}  # fmt: skip

    out = floor.jitter_series([(0, s(0.0, 0.0, 0)), (1, s(0.1, 0.2, 10)), (2, {}),
                               (3, s(0.1, 0.2, 10)), (4, s(0.5, 0.4, 20))])  # fmt: skip
    assert [t for t, _ in out] == [1, 4]
    assert abs(out[0][1]["jitter_buffer_ms"] - 10.0) < 1e-9
    assert abs(out[1][1]["jitter_buffer_ms"] - 40.0) < 1e-9
    assert abs(out[1][1]["jitter_target_ms"] - 20.0) < 1e-9


def test_interactive_goals_compare_to_the_stock_bare_floor() -> None:
    bare = {"latency_ms": {"render_to_server_ms": _lat(10.0, 20.0)}, "kept": 1.0,
            "webrtc": {"jitter_buffer_ms": 7.5}}  # fmt: skip
    smooth = {"latency_ms": {"end_to_end_ms": _lat(11.0, 21.0)}, "kept": 1.0,
              "webrtc": {"jitter_buffer_ms": 7.4}}  # fmt: skip
    fast = {"latency_ms": {"end_to_end_ms": _lat(5.0, 15.0)}, "kept": 0.999,
            "webrtc": {"jitter_buffer_ms": 0.1}}  # fmt: skip
    bare_fast = {"latency_ms": {"render_to_server_ms": _lat(4.0, 10.0)}, "kept": 1.0}
    g = floor.interactive_goals(bare, smooth, fast, bare_fast)
    assert (g["p50_ratio"], g["p99_ratio"]) == (0.5, 0.75)
    assert g["p50_ok"] is True and g["p99_ok"] is False  # 0.75 > 0.7
    assert g["vs_bare_interactive_p50"] == 1.25 and g["jitter_buffer_interactive_ms"] == 0.1
    assert g["jitter_buffer_bare_interactive_ms"] is None
    assert floor.interactive_goals(bare, smooth, fast)["bare_interactive_p50"] is None


def test_steady_state_leaves_out_the_first_seconds_of_each_path() -> None:
    s = 1_000_000_000
    start = [(t * s // 10, {"end_to_end_ms": 50.0}) for t in range(30)]  # 0-2.9 s: start-up
    rest = [(3 * s + t * s // 10, {"end_to_end_ms": float(t % 10)}) for t in range(100)]
    out = floor.steady([*rest, *start, (s, {"other_ms": 1.0})], "end_to_end_ms")
    assert out == {"p50": 4.5, "p99": 9.0, "n": 100}
    assert floor.steady([], "end_to_end_ms")["n"] == 0
    assert floor.steady(start, "end_to_end_ms", after_s=2.0)["n"] == 10


def test_interactive_goals_in_steady_state_beside_the_whole_run() -> None:
    def run(key: str, p50: float, p99: float, st50: float, st99: float) -> dict[str, Any]:
        return {"latency_ms": {key: _lat(p50, p99)}, "kept": 1.0,
                "steady_ms": {"p50": st50, "p99": st99, "n": 100}}  # fmt: skip

    bare = run("render_to_server_ms", 13.0, 22.0, 13.0, 21.0)
    smooth = run("end_to_end_ms", 15.0, 40.0, 14.5, 25.0)
    fast = run("end_to_end_ms", 7.0, 33.0, 6.9, 13.9)
    g = floor.interactive_goals(bare, smooth, fast)
    assert g["p99_ok"] is False  # 33 / 22: the start-up's tail
    st = g["steady"]
    assert st["p50_ok"] is True and st["p99_ok"] is True  # 6.9 / 13, 13.9 / 21
    assert st["interactive_p99"] == 13.9 and "bare_interactive_p50" not in st
    del bare["steady_ms"]
    assert floor.interactive_goals(bare, smooth, fast)["steady"] is None  # older results


def test_markdown_shows_interactive_mode_beside_smooth_and_the_floor() -> None:
    lat = {h: _lat(10.0, 20.0) for h in (*floor.HOPS, "analysed_to_router_ms", *floor.BARE_HOPS)}
    base = {"latency_ms": lat, "kept": 1.0, "worst_seconds": [], "skipped_late": 0,
            "simulator": {}, "webrtc": {"jitter_buffer_ms": 7.5}}  # fmt: skip
    fast_lat = {**lat, "end_to_end_ms": _lat(5.0, 13.0), "render_to_server_ms": _lat(4.0, 9.0)}
    fast = {**base, "latency_ms": fast_lat, "webrtc": {"jitter_buffer_ms": 0.1}}
    run = {"fps": 60.0, "bare": base, "carom": base, "goals": floor.goals(base, base),
           "interactive": fast, "bare_interactive": fast, "interactive_mode": "interactive",
           "interactive_goals": floor.interactive_goals(base, base, fast, fast)}  # fmt: skip
    md = floor.markdown({
        "when": "now", "seconds": 20.0, "runs": [run],
        "machine": {"nproc": 2, "cpu_model": "x", "python": "3.11", "load_avg_1m_at_start": 0.1},
    })  # fmt: skip
    assert (
        "| 60 | 10.0 / 20.0 | 10.0 / 20.0 | 5.0 / 13.0 | 0.50x / 0.65x | yes / yes | 4.0 / 9.0 "
        "| 100.00% / 100.00% | 7.5 / 7.5 / 0.1 / 0.1 |"
    ) in md, md
    assert "| 60 | Carom interactive | 10.0 / 20.0 |" in md
    assert "| 60 | bare interactive | 10.0 / 20.0 |" in md
