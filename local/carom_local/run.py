"""``local/run``: Carom end to end on one machine, no Docker.

Starts Apache Pulsar (or uses ``PULSAR_URL``), the simulator, the tracker, the recorder (typed
channels: camera, microphone, chat, points) and the router, with their logs combined and prefixed
and a status line every few seconds, then:

- headless (the default where there is no display, or ``--headless``): runs N client sessions
  through the router for a while, exactly as the page does (Python clients, or real headless
  Chromium pages with ``--clients chromium``, sending typed channels with ``--channels``), then
  prints their figures, the tracker's report, the folder of the CSV files, the paths of the PNG
  plots, and the recorder's report when channels were sent;
- serve (the default where there is a display, or ``--serve``): prints the page's URL and keeps
  everything up until Ctrl-C.

Ctrl-C at any point stops everything it started; nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from carom.schemas import playout_delay
from carom_local import cluster
from carom_local import pulsar as local_pulsar


class Service:
    """A child process whose output is copied line by line, prefixed with its name.

    The lines go to stdout (the run command's combined log) or, with ``log``, to a file (the
    benchmarks, whose own output must stay readable).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        health_url: str,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.health_url = health_url
        self._log: TextIO | None = log.open("a", encoding="utf-8") if log is not None else None
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in order.
            env={**os.environ, **env} if env else None,  # `env` adds to ours
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=self._copy, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _copy(self, stream: IO[bytes]) -> None:
        out = self._log or sys.stdout
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            print(f"[{self.name:9}] {line}", file=out, flush=True)

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
        if self._log is not None:
            self._log.close()


@dataclass
class StackOptions:
    """Where the services listen and write; the defaults are the run command's."""

    simulator_port: int = 8001
    router_port: int = 8000
    webtransport_port: int = 4433
    tracker_port: int = 8002
    recorder_port: int = 8003
    metrics_dir: str = "metrics"
    #: The recorder writes the typed channels' files to ``<recordings_dir>/<run>/<session>/``.
    recordings_dir: str = "recordings"
    run_name: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    #: Topic overrides (``truth``, ``centroids``, ``errors``), e.g. a benchmark's private ones.
    topics: dict[str, str] = field(default_factory=dict)
    #: The broker's admin API (the services create partitioned topics through it).
    admin_url: str = f"http://127.0.0.1:{local_pulsar.ADMIN_PORT}"
    #: Partitions of the three topics (``pulsar.partitions``; 0: plain topics).
    partitions: int = 0
    #: The tracker's durable subscription (its default when None).
    subscription: str | None = None
    #: Service logs to ``<log_dir>/<name>.log`` instead of stdout.
    log_dir: Path | None = None
    simulator_args: list[str] = field(default_factory=list)
    #: Sessions this stack must hold at once, all from this machine's one address: above the
    #: defaults (16 in the simulator, 16 per address in the router) both are raised to it.
    sessions: int = 0
    #: The secret the router sends and the simulator requires on its session API: a fresh one
    #: per run, handed to both through their env only (a flag would show in `ps`).
    simulator_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)


class Stack:
    """Simulator, tracker, recorder and router as child processes, started in order, stopped in
    reverse."""

    def __init__(self, pulsar_url: str, opts: StackOptions) -> None:
        self.pulsar_url = pulsar_url
        self.opts = opts
        self.services: dict[str, Service] = {}
        self.simulator_url = f"http://127.0.0.1:{opts.simulator_port}"
        self.router_url = f"http://127.0.0.1:{opts.router_port}"
        self.tracker_url = f"http://127.0.0.1:{opts.tracker_port}"
        self.recorder_url = f"http://127.0.0.1:{opts.recorder_port}"
        self.run_dir = (Path(opts.metrics_dir) / opts.run_name).absolute()
        self.recordings = (Path(opts.recordings_dir) / opts.run_name).absolute()

    def _start(
        self,
        name: str,
        module: str,
        args: list[str],
        url: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        common = ["--pulsar-url", self.pulsar_url, "--pulsar-admin-url", self.opts.admin_url]
        if self.opts.partitions:
            common += ["--pulsar-partitions", str(self.opts.partitions)]
        for kind, topic in sorted(self.opts.topics.items()):
            common += [f"--pulsar-topics-{kind}", topic]
        log = self.opts.log_dir / f"{name}.log" if self.opts.log_dir is not None else None
        argv = [sys.executable, "-m", module, *common, *args]
        svc = Service(name, argv, f"{url}/health", log, env)
        self.services[name] = svc
        svc.wait_healthy(60)

    def start(self) -> None:
        o = self.opts
        simulator = ["--http-port", str(o.simulator_port), *o.simulator_args]
        channels_csv = str(self.recordings / "router-channels.csv")
        router = ["--http-port", str(o.router_port), "--webtransport-port",
                  str(o.webtransport_port), "--simulator-url", self.simulator_url,
                  "--channels-metrics-csv", channels_csv]  # fmt: skip
        if o.sessions > 16:
            simulator += ["--max-sessions", str(o.sessions)]
            router += ["--limits-max-sessions-per-address", str(o.sessions)]
            router += ["--limits-max-sessions", str(max(64, o.sessions))]
        token = o.simulator_token
        self._start("simulator", "carom_simulator", simulator, self.simulator_url,
                    {"CAROM_SIMULATOR__ACCESS__TOKEN": token})  # fmt: skip
        tracker = ["--http-port", str(o.tracker_port), "--metrics-dir", o.metrics_dir,
                   "--run", o.run_name]  # fmt: skip
        if o.subscription:
            tracker += ["--subscription", o.subscription]
        self._start("tracker", "carom_tracker", tracker, self.tracker_url)
        # Typed channels (camera, microphone, screen, chat, points) land in this run's folder.
        recorder = ["--http-port", str(o.recorder_port), "--out-dir", str(self.recordings)]
        self._start("recorder", "carom_recorder", recorder, self.recorder_url)
        self._start("router", "carom_router", router, self.router_url,
                    {"CAROM_ROUTER__SIMULATOR__TOKEN": token})  # fmt: skip

    def alive(self) -> bool:
        return all(s.proc.poll() is None for s in self.services.values())

    def pids(self) -> dict[str, int]:
        return {name: s.proc.pid for name, s in self.services.items()}

    def stop(self) -> None:
        for s in reversed(list(self.services.values())):
            s.stop()


# --- the status line -----------------------------------------------------------------------------

Sample = dict[str, float]


def scrape(url: str, timeout: float = 1.0) -> Sample | None:
    """A service's /metrics as ``{'name{label="v"}': value}``; None when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as r:
            text = r.read().decode()
        out: Sample = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out
    except (OSError, ValueError, urllib.error.URLError):
        return None


# (label, service, metric, kind): "gauge" shown as is, "rate" per second, "count" over the interval
STATUS_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("sessions", "router", "carom_router_sessions", "gauge"),
    ("frames", "simulator", 'carom_simulator_frames_total{counter="frames_sent"}', "rate"),
    ("late", "simulator", 'carom_simulator_frames_total{counter="frames_late_dropped"}', "count"),
    ("truth", "simulator", 'carom_simulator_truth_messages_total{outcome="acked"}', "rate"),
    ("reports", "router", 'carom_router_reports_published_total{outcome="acked"}', "rate"),
    ("rows", "tracker", 'carom_tracker_rows_total{outcome="written"}', "rate"),
    ("missed", "tracker", 'carom_tracker_join_total{counter="missed"}', "count"),
)


def status_line(
    before: dict[str, Sample | None], after: dict[str, Sample | None], seconds: float
) -> str:
    """One compact line of what flowed in the interval; ``?`` where a service did not answer."""
    parts: list[str] = []
    for label, service, metric, kind in STATUS_FIELDS:
        a, b = before.get(service), after.get(service)
        if b is None or (kind != "gauge" and a is None):
            value = "?"
        elif kind == "gauge":
            value = f"{b.get(metric, 0.0):g}"
        else:
            assert a is not None
            delta = b.get(metric, 0.0) - a.get(metric, 0.0)
            value = f"{delta / seconds:.1f}/s" if kind == "rate" else f"{delta:g}"
        parts.append(f"{label} {value}")
    return "local/run: status: " + ", ".join(parts)


class StatusLine(threading.Thread):
    """Prints :func:`status_line` every ``interval`` seconds from its own thread, until stopped."""

    def __init__(
        self, urls: dict[str, str], interval: float, out: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(daemon=True, name="carom-status")
        self.urls = urls
        self.interval = interval
        self.out = out or (lambda line: print(line, flush=True))
        self._halt = threading.Event()

    def _sample(self) -> dict[str, Sample | None]:
        return {name: scrape(url) for name, url in self.urls.items()}

    def run(self) -> None:
        before, t0 = self._sample(), time.monotonic()
        while not self._halt.wait(self.interval):
            after, t1 = self._sample(), time.monotonic()
            try:
                self.out(status_line(before, after, max(t1 - t0, 1e-3)))
            except Exception as exc:  # a status line must never end the run
                self.out(f"local/run: status: ? ({type(exc).__name__})")
            before, t0 = after, t1

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# --- the command ---------------------------------------------------------------------------------


def private_topics(tag: str) -> dict[str, str]:
    """Topics of one run only, so other users of a shared broker neither see nor take its data."""
    return {
        k: f"persistent://public/default/carom-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }


def delete_topics(admin_url: str, topics: dict[str, str], partitioned: bool = False) -> None:
    """Drop private topics (and their subscriptions) from the broker; best effort."""
    for topic in topics.values():
        path = topic.replace("persistent://", "persistent/")
        if partitioned:
            path += "/partitions"
        req = urllib.request.Request(f"{admin_url}/admin/v2/{path}?force=true", method="DELETE")
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except (OSError, urllib.error.URLError):
            pass


def _port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def has_display(env: Mapping[str, str] = os.environ) -> bool:
    """A graphical session to open the page in (X11 or Wayland)."""
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def args_window_s(_args: argparse.Namespace) -> float:
    """How long to let the tracker finish: its join window (2 s) plus a flush."""
    return 2.5


#: Typed channels a headless page can send (``--channels``), and the point cloud's size.
CHANNELS = frozenset({"camera", "microphone", "chat", "points"})
CHANNEL_POINTS = 10_000


def _wait_recorded(folder: Path, timeout: float) -> None:
    """Until every type a session sent has its summary (the recorder got its ChannelEnd)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stores = [p for p in folder.glob("*/*.latency.csv")]
        if stores and all(p.with_name(p.name.replace(".latency.csv", ".summary.json")).exists()
                          for p in stores):  # fmt: skip
            return
        time.sleep(0.2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="local/run",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Without --headless or --serve: serve where a display exists (DISPLAY or "
        "WAYLAND_DISPLAY), headless elsewhere.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--headless", dest="mode", action="store_const", const="headless",
                      help="run N sessions for a duration, then print the figures")  # fmt: skip
    mode.add_argument("--serve", dest="mode", action="store_const", const="serve",
                      help="keep the services up for a browser until Ctrl-C")  # fmt: skip
    parser.add_argument("--clients", choices=["python", "chromium"], default="python",
                        help="headless clients: Python sessions in one process (default), or "
                        "real headless Chromium pages")  # fmt: skip
    parser.add_argument("-n", "--sessions", type=int, default=2,
                        help="headless sessions (default 2)")  # fmt: skip
    parser.add_argument("-d", "--duration", type=float, default=10.0,
                        help="seconds of the headless run (default 10)")  # fmt: skip
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    parser.add_argument("--gravity", type=float, help="px/s^2 (980 for the falling set-up)")
    parser.add_argument("--cor", type=float, help="coefficient of restitution")
    parser.add_argument("--background", metavar="NAME",
                        help="what the ball is drawn over: plain (default), texture or warm "
                        "(video clips Carom generates), or a clip of the simulator's "
                        "backgrounds.directory")  # fmt: skip
    parser.add_argument("--bitrate", type=int, metavar="BPS",
                        help="the encoder's target bits/s (default 0: its own)")  # fmt: skip
    parser.add_argument("--latency", default="smooth", metavar="MODE",
                        help="playout mode (chromium clients): smooth (the browser's buffering, "
                        "default), interactive (render on decode: about half the latency) or "
                        "MIN-MAX ms")  # fmt: skip
    parser.add_argument("--channels", default="", metavar="TYPES",
                        help="with --clients chromium: typed channels each page sends beside the "
                        "video, comma-separated: camera, microphone (Chromium's fake devices), "
                        "chat, points (10,000 points at 4 Hz); recorded to "
                        "<recordings-dir>/<run>/ (docs/channels.md)")  # fmt: skip
    parser.add_argument("--screenshots", action="store_true",
                        help="with --clients chromium: paint the pages and save each one as "
                             "page-N.png in the run's folder at the end of streaming")  # fmt: skip
    parser.add_argument("--status-every", type=float, default=5.0, metavar="SECONDS",
                        help="status line interval (default 5; 0: none)")  # fmt: skip
    parser.add_argument("--simulator-port", type=int, default=8001)
    parser.add_argument("--router-port", type=int, default=8000, help="router HTTP (TCP)")
    parser.add_argument("--webtransport-port", type=int, default=4433, help="router QUIC (UDP)")
    parser.add_argument("--tracker-port", type=int, default=8002)
    parser.add_argument("--recorder-port", type=int, default=8003)
    parser.add_argument("--pulsar", choices=["standalone", "cluster"], default="standalone",
                        help="the broker: local/pulsar's standalone (default), or a real cluster "
                        "of 1 ZooKeeper, 3 bookies and 2 brokers (local/pulsar cluster; kept "
                        "running after the run when it was already up)")  # fmt: skip
    parser.add_argument("--partitions", type=int, metavar="N",
                        help="partitions of the truth, centroids and errors topics (default: 0 "
                        "on the standalone, 4 on the cluster)")  # fmt: skip
    parser.add_argument("--private-topics", action="store_true",
                        help="topics of this run only, deleted at the end (for a broker that "
                        "other Carom runs share)")  # fmt: skip
    parser.add_argument("--metrics-dir", default="metrics",
                        help="the tracker writes <metrics-dir>/<run>/<session>.csv")  # fmt: skip
    parser.add_argument("--recordings-dir", default="recordings",
                        help="the recorder writes <recordings-dir>/<run>/<session>/")  # fmt: skip
    return parser


def _python_clients(args: argparse.Namespace, stack: Stack, pulsar_url: str) -> int:
    from carom_client import probe

    probe_args = [
        "--router", stack.router_url, "--pulsar-url", pulsar_url,
        "-n", str(args.sessions), "-d", str(args.duration), "--fps", str(args.fps),
    ]  # fmt: skip
    if args.gravity is not None:
        probe_args += ["--gravity", str(args.gravity)]
    if args.cor is not None:
        probe_args += ["--cor", str(args.cor)]
    for name in ("background", "bitrate"):
        if getattr(args, name) is not None:
            probe_args += [f"--{name}", str(getattr(args, name))]
    if "truth" in stack.opts.topics:
        probe_args += ["--truth-topic", stack.opts.topics["truth"]]
    return probe.main(probe_args)


def _chromium_clients(args: argparse.Namespace, stack: Stack) -> int:
    from carom_client import chromium

    params = {"fps": args.fps, "gravity": args.gravity, "cor": args.cor, "latency": args.latency,
              "background": args.background}  # fmt: skip
    if args.bitrate is not None:
        params["bitrate"] = args.bitrate // 1000  # the page takes kbps
    flags: list[str] = []
    for kind in CHANNELS.intersection(args.channels.split(",")):
        params[kind] = CHANNEL_POINTS if kind == "points" else 1
        if kind in ("camera", "microphone"):
            flags = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    if "chat" in args.channels.split(","):
        params["chat"] = "hello from local/run"
    shots = None
    if args.screenshots:
        shots = stack.run_dir
        shots.mkdir(parents=True, exist_ok=True)
    try:
        pages = asyncio.run(
            chromium.run_pages(
                stack.router_url,
                args.sessions,
                args.duration,
                params,
                screenshots=shots,
                extra_flags=flags,
            )
        )
    except chromium.ChromiumError as exc:
        print(f"local/run: {exc}", file=sys.stderr, flush=True)
        return 1
    for page in pages:
        print(page.line(), flush=True)
    return 0 if all(p.ok for p in pages) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mode = args.mode or ("serve" if has_display() else "headless")
    try:
        playout_delay(args.latency)
    except ValueError as exc:
        print(f"local/run: --latency: {exc}", file=sys.stderr)
        return 2
    if args.latency != "smooth" and args.clients == "python" and mode == "headless":
        print(
            "local/run: --latency is a browser's playout mode and the python clients have none "
            "(they would run smooth): add --clients chromium",
            file=sys.stderr,
        )
        return 2
    unknown = set(filter(None, args.channels.split(","))) - CHANNELS
    if unknown:
        print(f"local/run: --channels: unknown {', '.join(sorted(unknown))} (one of "
              f"{', '.join(sorted(CHANNELS))})", file=sys.stderr)  # fmt: skip
        return 2
    if args.channels and (args.clients != "chromium" or mode != "headless"):
        print("local/run: --channels needs --clients chromium (headless pages); in a browser, "
              "use the page's Channels panel", file=sys.stderr)  # fmt: skip
        return 2
    if args.screenshots and (args.clients != "chromium" or mode != "headless"):
        print("local/run: --screenshots needs --clients chromium (headless pages)", file=sys.stderr)
        return 2
    for port, flag, kind in (
        (args.simulator_port, "--simulator-port", socket.SOCK_STREAM),
        (args.router_port, "--router-port", socket.SOCK_STREAM),
        (args.webtransport_port, "--webtransport-port", socket.SOCK_DGRAM),
        (args.tracker_port, "--tracker-port", socket.SOCK_STREAM),
        (args.recorder_port, "--recorder-port", socket.SOCK_STREAM),
    ):
        if not _port_free(port, kind):
            print(
                f"local/run: port {port} is taken (another Carom running?); stop it or pass {flag}",
                file=sys.stderr,
            )
            return 1

    stack: Stack | None = None
    status: StatusLine | None = None
    broker: local_pulsar.Broker | cluster.Cluster | None = None
    topics: dict[str, str] = {}
    partitions = args.partitions if args.partitions is not None else 4 * (args.pulsar == "cluster")
    interrupted = False

    def on_sigterm(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    def cleanup() -> None:
        """Stop everything this command started, once (later calls do nothing)."""
        nonlocal stack, status, broker
        if status is not None:
            status.stop()
            status = None
        if stack is not None:
            stack.stop()
            stack = None
        if broker is not None:
            if topics:
                delete_topics(broker.admin_url, topics, partitioned=partitions > 0)
            if broker.started_here and not os.environ.get("CAROM_KEEP_PULSAR"):
                if isinstance(broker, cluster.Cluster):
                    cluster.stop()
                else:
                    local_pulsar.stop(quiet=interrupted)
                print("local/run: Pulsar stopped", flush=True)
            broker = None

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.pulsar == "cluster":
            print("local/run: starting an Apache Pulsar cluster ...", flush=True)
            broker = cluster.start(quiet=False)
        else:
            print("local/run: starting Apache Pulsar ...", flush=True)
            broker = local_pulsar.start()
        print(f"local/run: Pulsar ready at {broker.service_url}", flush=True)
        opts = StackOptions(
            simulator_port=args.simulator_port, router_port=args.router_port,
            webtransport_port=args.webtransport_port, tracker_port=args.tracker_port,
            recorder_port=args.recorder_port, metrics_dir=args.metrics_dir,
            recordings_dir=args.recordings_dir, sessions=args.sessions,
            admin_url=broker.admin_url, partitions=partitions,
        )  # fmt: skip
        if args.private_topics:
            topics = opts.topics = private_topics(opts.run_name.lower())
            opts.subscription = f"carom-tracker-{opts.run_name.lower()}"
        stack = Stack(broker.service_url, opts)
        stack.start()
        print(
            f"local/run: simulator {stack.simulator_url}, router {stack.router_url} "
            f"(WebTransport https://127.0.0.1:{args.webtransport_port}/wt), tracker writing "
            f"{stack.run_dir}/; tail a topic with .venv/bin/carom-consume "
            f"{topics['truth'] if topics else 'truth|centroids|errors'} -n 0",
            flush=True,
        )
        if args.status_every > 0:
            status = StatusLine(
                {"simulator": stack.simulator_url, "router": stack.router_url,
                 "tracker": stack.tracker_url, "recorder": stack.recorder_url},
                args.status_every,
            )  # fmt: skip
            status.start()
        if mode == "serve":
            print(
                f"local/run: open {stack.router_url}/ in Chromium to watch and track the ball",
                flush=True,
            )
            print("local/run: running; Ctrl-C stops everything", flush=True)
            while stack.alive():
                time.sleep(0.5)
            print("local/run: a service exited; stopping", flush=True)
            return 1
        print(
            f"local/run: {args.sessions} headless {args.clients} session(s) at {args.fps:g} fps "
            f"for {args.duration:g} s (the page is at {stack.router_url}/) ...",
            flush=True,
        )
        if args.clients == "chromium":
            rc = _chromium_clients(args, stack)
        else:
            rc = _python_clients(args, stack, broker.service_url)
        time.sleep(args_window_s(args))  # the tracker closes the last frames' window
        run_dir, recordings = stack.run_dir, stack.recordings
        if args.channels:  # the recorder finalizes a type on its ChannelEnd: give it a moment
            _wait_recorded(recordings, 15.0)
        cleanup()  # first, so that the output ends with the figures and the files
        from carom_tracker import records, report

        print(f"local/run: tracker report (CSV files in {run_dir}/)", flush=True)
        report_rc = report.main([str(run_dir)])
        shots = sorted(run_dir.glob("page-*.png"))
        outputs = [("CSV files (one per session)", sorted(run_dir.glob("*.csv"))),
                   ("session records (phases, browser stats)",
                    sorted(run_dir.glob(f"*{records.SUFFIX}"))),
                   ("PNG plots", sorted(set(run_dir.glob("*.png")) - set(shots)))]  # fmt: skip
        if args.screenshots:
            outputs.append(("page screenshots", shots))
        for what, files in outputs:
            shown = " ".join(map(str, files[:8])) + (f" ... ({len(files)})" if files[8:] else "")
            print(f"local/run: {what}: {shown or 'none'}", flush=True)
        if any(recordings.glob("*/*.summary.json")):
            from carom_recorder import report as channels_report

            print(f"local/run: typed channels (recordings in {recordings}/)", flush=True)
            print(channels_report.report(recordings), flush=True)
        print("local/run: done", flush=True)
        return rc or report_rc
    except KeyboardInterrupt:
        interrupted = True
        print("\nlocal/run: interrupted; stopping everything", flush=True)
        return 0 if mode == "serve" else 130  # Ctrl-C is how serving ends
    except (RuntimeError, local_pulsar.PulsarError) as exc:
        print(f"local/run: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup()
        if interrupted:
            print("local/run: everything stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
