"""The run command, briefly, as a user runs it: output figures, and nothing left running."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carom_local.pulsar import Broker
from tests.services import free_port

pytestmark = pytest.mark.integration


def _ours(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_run_command_prints_figures_and_leaves_nothing(
    pulsar_broker: Broker, tmp_path: Path
) -> None:
    sim, router, wt, tracker = free_port(), free_port(), free_port(socket.SOCK_DGRAM), free_port()
    env = dict(os.environ, PULSAR_URL=pulsar_broker.service_url)
    r = subprocess.run(
        [sys.executable, "-m", "carom_local.run", "-n", "1", "-d", "3",
         "--simulator-port", str(sim), "--router-port", str(router),
         "--webtransport-port", str(wt), "--tracker-port", str(tracker),
         "--metrics-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(
        r"overall: frames (\d+), matched to truth (\d+) \(([\d.]+)%\), L2 mean ([\d.]+)", r.stdout
    )
    if m is None:  # one session: its own line is the overall figure
        m = re.search(
            r"\[H264\]: frames (\d+), matched to truth (\d+) \(([\d.]+)%\), L2 mean ([\d.]+)",
            r.stdout,
        )
    assert m is not None, r.stdout[-3000:]
    frames, matched, rate, l2 = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert frames >= 60 and matched >= 0.95 * frames and rate >= 95.0 and l2 < 0.5, m[0]
    assert "reports sent" in r.stdout and "[router" in r.stdout and "[simulator" in r.stdout
    # The tracker's report: figures per hop, and the CSV and PNG files it names exist.
    assert "end_to_end_ms" in r.stdout and "overall:" in r.stdout, r.stdout[-3000:]
    csvs = list(tmp_path.glob("*/*.csv"))
    pngs = [Path(p) for p in re.findall(r"wrote (\S+\.png)", r.stdout)]
    assert csvs and len(pngs) == 3 and all(p.exists() for p in pngs), r.stdout[-2000:]
    assert str(csvs[0].parent) in r.stdout
    time.sleep(0.5)
    for port in (sim, router, tracker):
        assert not _ours(f"--http-port {port}")


def test_port_taken_gives_one_line(pulsar_broker: Broker) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "carom_local.run", "--simulator-port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and f"port {port} is taken" in r.stderr
