"""``local/run``: Carom end to end on one machine, no Docker.

Starts Apache Pulsar (or uses ``PULSAR_URL``), the simulator and the router, with their logs
combined and prefixed, then runs headless client sessions through the router exactly as the page
does (WebTransport, video negotiated through the router, a report per frame), scores every frame
against its truth and prints the figures. With
``--serve`` it keeps the services up until Ctrl-C instead. Ctrl-C at any point stops everything it
started; nothing is left running.

As services land (router, tracker, the page) they join this command.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import IO

from carom_local import pulsar as local_pulsar


class Service:
    """A child process whose output is copied line by line, prefixed with its name."""

    def __init__(self, name: str, argv: list[str], health_url: str) -> None:
        self.name = name
        self.health_url = health_url
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in order.
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=self._copy, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _copy(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            print(f"[{self.name:9}] {line}", flush=True)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start (code {self.proc.returncode})")
            try:
                with urllib.request.urlopen(self.health_url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s ({self.health_url})")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"[{self.name:9}] did not stop in {timeout:.0f} s: killed", flush=True)
                self.proc.kill()
                self.proc.wait()
        self._pump.join(2)


def _port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def args_window_s(_args: argparse.Namespace) -> float:
    """How long to let the tracker finish: its join window (2 s) plus a flush."""
    return 2.5


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local/run", description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="keep running until Ctrl-C")
    parser.add_argument("-n", "--sessions", type=int, default=2, help="headless sessions")
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--gravity", type=float, help="px/s^2 (980 for the falling set-up)")
    parser.add_argument("--cor", type=float, help="coefficient of restitution")
    parser.add_argument("--simulator-port", type=int, default=8001)
    parser.add_argument("--router-port", type=int, default=8000, help="router HTTP (TCP)")
    parser.add_argument("--webtransport-port", type=int, default=4433, help="router QUIC (UDP)")
    parser.add_argument("--tracker-port", type=int, default=8002)
    parser.add_argument("--metrics-dir", default="metrics", help="where the tracker writes CSVs")
    args = parser.parse_args(argv)
    for port, flag, kind in (
        (args.simulator_port, "--simulator-port", socket.SOCK_STREAM),
        (args.router_port, "--router-port", socket.SOCK_STREAM),
        (args.webtransport_port, "--webtransport-port", socket.SOCK_DGRAM),
        (args.tracker_port, "--tracker-port", socket.SOCK_STREAM),
    ):
        if not _port_free(port, kind):
            print(
                f"local/run: port {port} is taken (another Carom running?); stop it or pass {flag}",
                file=sys.stderr,
            )
            return 1

    services: list[Service] = []
    broker: local_pulsar.Broker | None = None
    interrupted = False

    def on_sigterm(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        print("local/run: starting Apache Pulsar ...", flush=True)
        broker = local_pulsar.start()
        print(f"local/run: Pulsar ready at {broker.service_url}", flush=True)
        sim_url = f"http://127.0.0.1:{args.simulator_port}"
        sim = Service(
            "simulator",
            [sys.executable, "-m", "carom_simulator", "--pulsar-url", broker.service_url,
             "--http-port", str(args.simulator_port)],
            f"{sim_url}/health",
        )  # fmt: skip
        services.append(sim)
        sim.wait_healthy(60)
        run_name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        tracker = Service(
            "tracker",
            [sys.executable, "-m", "carom_tracker", "--pulsar-url", broker.service_url,
             "--http-port", str(args.tracker_port), "--metrics-dir", args.metrics_dir,
             "--run", run_name],
            f"http://127.0.0.1:{args.tracker_port}/health",
        )  # fmt: skip
        services.append(tracker)
        tracker.wait_healthy(60)
        router_url = f"http://127.0.0.1:{args.router_port}"
        router = Service(
            "router",
            [sys.executable, "-m", "carom_router", "--pulsar-url", broker.service_url,
             "--http-port", str(args.router_port),
             "--webtransport-port", str(args.webtransport_port), "--simulator-url", sim_url],
            f"{router_url}/health",
        )  # fmt: skip
        services.append(router)
        router.wait_healthy(60)
        print(
            f"local/run: simulator {sim_url}, router {router_url} "
            f"(WebTransport https://127.0.0.1:{args.webtransport_port}/wt), tracker writing "
            f"{args.metrics_dir}/{run_name}/; tail a topic with "
            ".venv/bin/carom-consume truth|centroids|errors -n 0",
            flush=True,
        )
        print(f"local/run: open {router_url}/ in Chromium to watch and track the ball", flush=True)
        if args.serve:
            print("local/run: running; Ctrl-C stops everything", flush=True)
            while all(s.proc.poll() is None for s in services):
                time.sleep(0.5)
            print("local/run: a service exited; stopping", flush=True)
            return 1
        from carom_client import probe

        probe_args = [
            "--router", router_url, "--pulsar-url", broker.service_url,
            "-n", str(args.sessions), "-d", str(args.duration), "--fps", str(args.fps),
        ]  # fmt: skip
        if args.gravity is not None:
            probe_args += ["--gravity", str(args.gravity)]
        if args.cor is not None:
            probe_args += ["--cor", str(args.cor)]
        print(
            f"local/run: {args.sessions} headless session(s) at {args.fps:g} fps for "
            f"{args.duration:g} s ...",
            flush=True,
        )
        rc = probe.main(probe_args)
        time.sleep(args_window_s(args))  # the tracker closes the last frames' window
        from carom_tracker import report

        print(
            f"local/run: tracker report (CSV files in {args.metrics_dir}/{run_name}/)", flush=True
        )
        report_rc = report.main([str(os.path.join(args.metrics_dir, run_name))])
        print("local/run: done", flush=True)
        return rc or report_rc
    except KeyboardInterrupt:
        interrupted = True
        print("\nlocal/run: interrupted; stopping everything", flush=True)
        return 130
    except (RuntimeError, local_pulsar.PulsarError) as exc:
        print(f"local/run: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        for s in reversed(services):
            s.stop()
        if broker is not None and broker.started_here and not os.environ.get("CAROM_KEEP_PULSAR"):
            local_pulsar.stop(quiet=interrupted)
            print("local/run: Pulsar stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
