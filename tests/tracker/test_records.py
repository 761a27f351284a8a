"""A session's records file: one contract message a line, known by a key a redelivery repeats."""

from __future__ import annotations

from pathlib import Path

import pytest

from carom import schemas
from carom.schemas import ClientStats, PhaseSummary, SessionEnd
from carom_tracker import records

T0 = 1_795_000_000 * 10**9
S = 10**9


def phase(n: int, **kw: object) -> PhaseSummary:
    base: dict[str, object] = dict(
        phase=n, state="streaming", first_frame=60 * n, frames_due=60, frames_sent=60,
        t_start_ns=T0 + 2 * n * S, t_end_ns=T0 + 2 * (n + 1) * S, fps=30.0, width=640,
        height=480, bitrate=0, keyframe_interval=0, gravity=0.0, vx=100.0, vy=0.0, cor=1.0,
        background="plain", bytes_sent=250_000,
    )  # fmt: skip
    return PhaseSummary(**{**base, **kw})  # type: ignore[arg-type]


def end(sid: str = "s-1", t: int = T0 + 4 * S) -> SessionEnd:
    return SessionEnd(session_id=sid, frames_due=120, t_end_ns=t, phases=[phase(0), phase(1)])


def stats(t: int, sid: str = "s-1") -> ClientStats:
    return ClientStats(session_id=sid, t_router_recv_ns=t, fps=30.0, bytes_received=t - T0)


def test_a_record_is_known_by_what_its_redelivery_repeats() -> None:
    assert records.key(end()) == ("session_end", T0 + 4 * S)
    assert records.key(stats(T0 + 5)) == ("client_stats", T0 + 5)
    # a session id used again later: other times, never taken for a duplicate
    assert records.key(end(t=T0 + 99 * S)) != records.key(end())


def test_lines_are_the_contract_encoding_and_read_back() -> None:
    line = records.to_line(end())
    assert line.endswith("\n") and line.count("\n") == 1
    assert line == schemas.encode(end()).decode() + "\n"
    assert records.from_line(line) == end()
    assert records.from_line(records.to_line(stats(T0))) == stats(T0)
    truth = schemas.Truth(session_id="s-1", frame=0, rtp_ts=0, x=1.0, y=1.0, t_render_ns=T0)
    with pytest.raises(ValueError, match="not a session record"):
        records.from_line(schemas.encode(truth).decode())
    assert list(records.keys(line + "garbage\n" + records.to_line(stats(T0)))) == [
        ("session_end", T0 + 4 * S),
        ("client_stats", T0),
    ]


def test_read_keeps_each_record_once_and_leaves_a_torn_line_out(tmp_path: Path) -> None:
    path = tmp_path / f"s-1{records.SUFFIX}"
    assert records.path_for(tmp_path / "s-1.csv") == path
    lines: list[records.Record] = [stats(T0 + 3 * S), end(), stats(T0 + S), stats(T0 + 3 * S)]
    lines.append(end())
    path.write_text("".join(map(records.to_line, lines)) + records.to_line(stats(T0))[:30])
    got = records.read([path, tmp_path / "absent.session.jsonl"])
    assert got.duplicates == 2 and got.torn
    assert [s.t_router_recv_ns for s in got.stats] == [T0 + S, T0 + 3 * S]  # by time
    assert got.ends == [end()] and [p.phase for p in got.phases] == [0, 1]
    assert records.read([tmp_path / "none.session.jsonl"]).phases == []


def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / f"s-1{records.SUFFIX}"
    path.write_text(records.to_line(end()) + '{"kind":"client_stats","fps":-1}\n')
    with pytest.raises(ValueError, match=r"s-1\.session\.jsonl:2: .*fps"):
        records.read([path])
