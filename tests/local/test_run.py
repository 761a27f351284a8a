"""The run command, briefly, as a user runs it: output figures, and nothing left running.

"Nothing left running" is checked by an environment variable with a fresh value that the run
command passes on to everything it starts (services, Playwright's driver, Chromium and its
helpers): afterwards no process may carry it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from carom_local import run
from carom_local.pulsar import Broker
from tests.services import free_port, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _leftovers(tag: str) -> list[str]:
    """Live processes (not zombies) whose environment carries ``CAROM_RUN_TAG=tag``."""
    needle = f"CAROM_RUN_TAG={tag}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{entry.name} {cmd[:200]}")
        except OSError:
            continue
    return out


def _no_leftovers(tag: str, within: float = 10.0) -> None:
    wait_until(
        lambda: not _leftovers(tag),
        lambda: f"no process of the run left: {_leftovers(tag)}",
        within,
        every=0.3,
    )


def _ports() -> list[str]:
    """Free ports, and topics of the run's own: other users of the shared broker stay apart."""
    return [
        "--private-topics",
        "--simulator-port", str(free_port()), "--router-port", str(free_port()),
        "--webtransport-port", str(free_port(socket.SOCK_DGRAM)),
        "--tracker-port", str(free_port()), "--recorder-port", str(free_port()),
    ]  # fmt: skip


def _env(broker: Broker, tag: str, display: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(PULSAR_URL=broker.service_url, CAROM_RUN_TAG=tag, PYTHONUNBUFFERED="1")
    if display is not None:
        env["DISPLAY"] = display
    return env


def _assert_report(out: str, tmp_path: Path) -> None:
    """The tracker's report: figures per hop, and the CSV folder and PNG files it names."""
    assert "end_to_end_ms" in out and "overall:" in out, out[-3000:]
    csvs = list(tmp_path.glob("*/*.csv"))
    pngs = [Path(p) for p in re.findall(r"wrote (\S+\.png)", out)]
    assert csvs and len(pngs) == 3 and all(p.exists() for p in pngs), out[-2000:]
    listed = re.search(r"local/run: CSV files \(one per session\): (.+)", out)
    plots = re.search(r"local/run: PNG plots: (.+)", out)
    assert listed and plots and out.rstrip().endswith("local/run: done"), out[-1000:]
    assert sorted(listed[1].split()) == sorted(map(str, csvs))
    assert sorted(plots[1].split()) == sorted(map(str, pngs))


def test_run_command_prints_figures_and_leaves_nothing(
    pulsar_broker: Broker, tmp_path: Path
) -> None:
    """No display: the default is the headless run, which ends with the figures and paths."""
    tag = uuid.uuid4().hex
    r = subprocess.run(
        [sys.executable, "-m", "carom_local.run", "-n", "1", "-d", "3", "--status-every", "1",
         *_ports(), "--metrics-dir", str(tmp_path),
         "--recordings-dir", str(tmp_path / "recordings")],
        env=_env(pulsar_broker, tag), capture_output=True, text=True, timeout=180, check=False,
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
    assert "1 headless python session(s)" in r.stdout
    # The status line, with real rates while the session ran.
    assert re.search(r"local/run: status: sessions 1, frames [1-9][\d.]*/s", r.stdout), r.stdout
    _assert_report(r.stdout, tmp_path)
    _no_leftovers(tag)
    # Its private topics are gone from the broker.
    topic = re.search(r"carom-consume (persistent://\S+) -n 0", r.stdout)
    assert topic is not None and "carom-truth-" in topic[1], r.stdout[:3000]
    with urllib.request.urlopen(
        f"{pulsar_broker.admin_url}/admin/v2/persistent/public/default", timeout=10
    ) as resp:
        assert topic[1] not in json.loads(resp.read())


class _Lines:
    """A child's stdout, read on a thread, so the test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._t = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._t.start()

    def _read(self, stream: Iterator[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> str:
        return wait_until(
            lambda: next((line for line in list(self.lines) if re.search(pattern, line)), None),
            lambda: f"a line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]),
            timeout,
            every=0.2,
        )

    @property
    def text(self) -> str:
        self._t.join(5)
        return "\n".join(self.lines)


def _ctrl_c(proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(timeout)


def test_display_means_serve_and_ctrl_c_stops_everything(
    pulsar_broker: Broker, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "carom_local.run", "--status-every", "1", *_ports(),
         "--metrics-dir", str(tmp_path), "--recordings-dir", str(tmp_path / "recordings")],
        env=_env(pulsar_broker, tag, display=":99"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    out = _Lines(proc)
    try:
        out.wait_for(r"local/run: open http://127\.0\.0\.1:\d+/ in Chromium", 90)
        out.wait_for(r"local/run: running; Ctrl-C stops everything", 5)
        out.wait_for(r"local/run: status: sessions 0, frames 0\.0/s", 10)
        rc = _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, out.text[-3000:]
    assert "local/run: interrupted; stopping everything" in out.text
    assert out.text.rstrip().endswith("local/run: everything stopped"), out.text[-2000:]
    assert "headless" not in out.text
    _no_leftovers(tag)


def test_chromium_clients(pulsar_broker: Broker, tmp_path: Path) -> None:
    """Real headless Chromium pages, in interactive mode: their own figures, then the tracker's
    report, both saying the mode; the page's screenshot in the run's folder."""
    tag = uuid.uuid4().hex
    r = subprocess.run(
        [sys.executable, "-m", "carom_local.run", "--headless", "--clients", "chromium",
         "--latency", "interactive", "--screenshots", "--channels", "chat,points",
         "-n", "1", "-d", "4", *_ports(), "--metrics-dir", str(tmp_path),
         "--recordings-dir", str(tmp_path / "recordings")],
        env=_env(pulsar_broker, tag, display=":99"),  # --headless wins over the display
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(
        r"chromium page 0 (\S+) \[H264, latency interactive\]: frames reported (\d+) "
        r"\(no ball (\d+)\), "
        r"live results (\d+) \(missed (\d+)\), live L2 mean ([\d.]+) px",
        r.stdout,
    )
    assert m is not None, r.stdout[-3000:]
    reported, no_ball, results, l2 = int(m[2]), int(m[3]), int(m[4]), float(m[6])
    assert reported >= 90 and no_ball == 0 and results >= 0.9 * reported and l2 < 0.5, m[0]
    _assert_report(r.stdout, tmp_path)
    # The tracker joined that page's frames, every one sent in interactive mode.
    joined = re.search(rf"session {re.escape(m[1])}: coverage .*; latency (\S+)", r.stdout)
    assert joined is not None and joined[1] == "interactive", r.stdout[-3000:]
    (shot,) = tmp_path.glob("*/page-0.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # --channels chat,points: the page sent both beside its video; the recorder's report follows.
    sent = re.search(r"; channels chat (\d+) sent .*, points (\d+) sent", r.stdout)
    assert sent is not None and int(sent[1]) == 1 and int(sent[2]) >= 8, r.stdout[-3000:]
    assert "local/run: typed channels (recordings in" in r.stdout, r.stdout[-3000:]
    verdicts = re.findall(rf"{re.escape(m[1])} (chat|points): (\S+)", r.stdout)
    assert sorted(verdicts) == [("chat", "exactly_once,"), ("points", "exactly_once,")], r.stdout[
        -3000:
    ]
    _no_leftovers(tag)


def test_ctrl_c_during_chromium_run_leaves_nothing(pulsar_broker: Broker, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "carom_local.run", "--clients", "chromium", "-n", "1", "-d", "60",
         "--status-every", "1", *_ports(), "--metrics-dir", str(tmp_path),
         "--recordings-dir", str(tmp_path / "recordings")],
        env=_env(pulsar_broker, tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    out = _Lines(proc)
    try:
        out.wait_for(r"local/run: status: sessions 1, frames [1-9]", 120)
        assert _leftovers(tag)  # the marker works: services and Chromium carry it
        rc = _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 130, out.text[-3000:]
    assert "local/run: interrupted; stopping everything" in out.text
    _no_leftovers(tag)


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


def test_missing_maven_gives_one_line(tmp_path: Path) -> None:
    """The real ``local/run`` and ``local/bootstrap`` on a machine with neither Maven nor a way
    to install it (no apt-get): one line that says so, and nothing else.

    They run from a scratch root (a copy of the two scripts, an installed-looking .venv) so that
    nothing is installed and the repository's own .venv is left alone.
    """
    (tmp_path / "local").mkdir()
    for name in ("run", "bootstrap"):
        shutil.copy2(ROOT / "local" / name, tmp_path / "local" / name)
    for name in ("requirements.lock", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    digest = subprocess.run(
        "sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16",
        shell=True, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / f".carom-lock-{digest}").touch()
    # A PATH with the usual tools and Python, but no mvn and no apt-get.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))  # not a pyenv shim
    for tool in ("bash", "dirname", "mktemp", "tee", "grep", "tail", "sed", "rm", "sleep",
                 "sha256sum", "cut", "id", "touch", "cat", "printf"):  # fmt: skip
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    r = subprocess.run(
        ["/usr/bin/env", "bash", str(tmp_path / "local" / "run"), "-d", "1"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "maven" in lines[0].lower(), r.stderr


# --- pure parts ----------------------------------------------------------------------------------


def test_default_mode_follows_the_display() -> None:
    assert run.has_display({"DISPLAY": ":0"}) and run.has_display({"WAYLAND_DISPLAY": "w-0"})
    assert not run.has_display({}) and not run.has_display({"DISPLAY": ""})


def test_status_line_rates_and_unanswered_services() -> None:
    before: dict[str, run.Sample | None] = {
        "simulator": {'carom_simulator_frames_total{counter="frames_sent"}': 100.0,
                      'carom_simulator_truth_messages_total{outcome="acked"}': 100.0},
        "router": {"carom_router_sessions": 2.0},
        "tracker": None,
    }  # fmt: skip
    after: dict[str, run.Sample | None] = {
        "simulator": {'carom_simulator_frames_total{counter="frames_sent"}': 400.0,
                      'carom_simulator_truth_messages_total{outcome="acked"}': 399.0},
        "router": None,
        "tracker": {'carom_tracker_rows_total{outcome="written"}': 10.0},
    }  # fmt: skip
    line = run.status_line(before, after, 5.0)
    assert line == (
        "local/run: status: sessions ?, frames 60.0/s, late 0, truth 59.8/s, reports ?, "
        "rows ?, missed ?"
    )
    assert run.scrape(f"http://127.0.0.1:{free_port()}") is None


def test_latency_flag_is_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--latency", "fast", "--headless"]) == 2
    assert "--latency: latency 'fast'" in capsys.readouterr().err
    # The Python clients have no playout buffer: interactive would silently run smooth.
    assert run.main(["--latency", "interactive", "--headless"]) == 2
    assert "add --clients chromium" in capsys.readouterr().err
    assert run.main(["--screenshots", "--headless"]) == 2  # python clients have no page
    assert "--screenshots needs --clients chromium" in capsys.readouterr().err
