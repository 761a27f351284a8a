"""``carom-recorder`` refuses what it cannot run with (exit 2, the reason named), and
``carom-recorder report`` reads a recordings folder (no broker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from carom_recorder.ledger import Ledger, Row
from carom_recorder.main import main
from carom_recorder.store import TypeFiles
from tests.recorder import records


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carom_recorder", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("routes", "said"),
    [
        (None, "cannot read routes file"),
        ("routes: [", "is not valid YAML"),
        ("routes:\n  chat: {topic: persistent://public/default/x, format: txt}\n", "routes.chat"),
        ("routes: {}\n", "has no routes"),
    ],
)
def test_a_bad_routes_file_stops_the_start(tmp_path: Path, routes: str | None, said: str) -> None:
    path = tmp_path / "routes.yaml"
    if routes is not None:
        path.write_text(routes)
    # An unreachable broker: the routes are checked before any connection is tried.
    got = run("--routes-file", str(path), "--pulsar-url", "pulsar://127.0.0.1:1",
              "--out-dir", str(tmp_path / "out"), "--http-port", "0")  # fmt: skip
    assert got.returncode == 2, got.stderr
    assert said in got.stderr and "Traceback" not in got.stderr


def test_a_bad_setting_is_named() -> None:
    got = run("--idle-finalize-s", "0")
    assert got.returncode == 2 and "idle_finalize_s" in got.stderr


def test_report_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msgs = records.chat("s1", ["a", "b", "c"])
    files = TypeFiles(tmp_path, "s1", "chat", "text")
    ledger = Ledger("s1", "chat")
    for i, m in enumerate(msgs):
        ledger.admit(m.seq, f"1:{i}:-1:-1")
        files.write_data(m)
        row = Row.of(m, f"1:{i}:-1:-1", m.t_published_ns + 2_000_000)
        files.write_row(row)
        ledger.written(row)
    files.sync_rows()
    ledger.end = records.end_of(msgs)
    files.write_summary(ledger.summary(files.write_media()))
    files.close()
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "chat" in out and "2.00 / 2.00" in out  # published -> consumed, every row 2 ms
    assert "s1 chat: exactly_once, received 3 of 3" in out
    assert out.rstrip().endswith("1 of 1 exactly once")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
