"""bench/bitrate.py's pure parts: rates, the join of one step's window, the verdict on a target,
the whole-phase bitrate and the table. No timing is asserted."""

from __future__ import annotations

import pytest

from bench import bitrate
from carom.schemas import PhaseSummary
from carom_client.video import DecodedFrame
from carom_simulator.origin import PendingTruth, Stamped

S = 1_000_000_000


def test_rates_and_sizes_parse_as_people_write_them() -> None:
    assert [bitrate.parse_rate(t) for t in ("0", "100k", "1M", "1.5m", "250000")] == [
        0, 100_000, 1_000_000, 1_500_000, 250_000
    ]  # fmt: skip
    assert bitrate.parse_size("1280x720") == (1280, 720)


def test_a_target_is_met_under_or_over_and_over_means_not_in_force() -> None:
    assert bitrate.verdict(0, 900_000.0) == "default"
    assert bitrate.verdict(300_000, 310_000.0) == "met"
    assert bitrate.verdict(100_000, 1_160_000.0) == "over"  # the encoder ran at REMB's rate
    assert bitrate.verdict(5_000_000, 260_000.0) == "under"  # a plain ball needs no more


def _stamped(frame: int, phase: int, t_ns: int, sent: bool = True) -> Stamped:
    truth = PendingTruth(frame, 3000 * frame, 100.0, 50.0, t_ns, sent, phase, 640, 480)
    return Stamped(truth, 7 + 3000 * frame)


def test_a_step_counts_its_phase_in_its_window_and_joins_by_rtp_timestamp() -> None:
    t0 = 10 * S
    records = [
        _stamped(0, 1, t0 + 1),  # the phase before: not this step's
        _stamped(1, 2, t0 - 1),  # this phase, settling: discarded
        _stamped(2, 2, t0),  # decoded, found 3-4-5 px away
        _stamped(3, 2, t0 + S // 2, sent=False),  # due, skipped as late: counts as due
        _stamped(4, 2, t0 + S // 2),  # decoded, no ball found
        _stamped(5, 2, t0 + S // 2 + 1),  # sent, never decoded
        _stamped(6, 2, t0 + S),  # past the window
    ]
    frames = [
        DecodedFrame(7 + 3000 * 2, t0 + 20_000_000, 0, (103.0, 54.0), 640, 480),
        DecodedFrame(7 + 3000 * 4, t0 + S // 2 + 40_000_000, 0, None, 640, 480),
        DecodedFrame(7 + 3000 * 6, t0 + S + 1, 0, (100.0, 50.0), 640, 480),
    ]
    w = bitrate.Window(2, 300_000, t0, t0 + S, 40_000, 300_000, 0, 0.5, 1.25)
    row = bitrate.step_row(records, frames, w)
    assert (row["frames_due"], row["frames_sent"], row["frames_decoded"]) == (4, 3, 2)
    assert row["frames_detected"] == 1 and row["detection_rate"] == 0.5
    assert row["decoded_share"] == 0.5
    assert row["l2_mean_px"] == row["l2_p50_px"] == row["l2_max_px"] == 5.0
    assert row["latency_p50_ms"] == 30.0  # 20 and 40 ms
    assert row["sent_kbps"] == 320.0 and row["verdict"] == "met"
    assert row["bytes_per_frame"] == round(40_000 / 3)
    assert row["cpu_process_cores"] == 0.5 and row["cpu_others_cores"] == 0.75


def test_a_step_with_nothing_decoded_says_so_instead_of_inventing_figures() -> None:
    w = bitrate.Window(0, 0, 0, S, 0, None, None, 0.0, 0.0)
    row = bitrate.step_row([_stamped(0, 0, 5)], [], w)
    assert row["frames_decoded"] == 0 and row["detection_rate"] is None
    assert row["l2_p50_px"] is None and row["latency_p99_ms"] is None
    assert "| - |" in bitrate.table([{**_config(), **row}])


def _config() -> dict[str, object]:
    return {"encoder": "tuned", "width": 640, "height": 480, "fps": 30.0, "background": "plain"}


def test_whole_phase_bitrate_comes_from_the_session_end() -> None:
    def phase(n: int, seconds: float, nbytes: int) -> PhaseSummary:
        return PhaseSummary(
            phase=n, state="streaming", first_frame=0, frames_due=1, frames_sent=1,
            t_start_ns=S, t_end_ns=S + int(seconds * S), fps=30.0, width=640, height=480,
            bitrate=0, keyframe_interval=0, gravity=0.0, vx=0.0, vy=0.0, cor=1.0,
            background="plain", bytes_sent=nbytes,
        )  # fmt: skip

    assert bitrate.phase_kbps([phase(0, 2.0, 25_000), phase(1, 0.0, 9)]) == {0: 100.0}


def test_percentile_of_nothing_is_none() -> None:
    assert bitrate.percentile([], 50) is None
    assert bitrate.percentile([1.0, 2.0, 3.0], 50) == pytest.approx(2.0)
