"""``local/compose-check``: ``docker-compose up`` for real, checked from outside the containers.

On this machine (as root) it starts a Docker engine of its own in a network namespace of its own
(its own data root, exec root, socket and pid file: never the system's), then:

1. images: the base ``python`` and ``apachepulsar/pulsar`` images come from a registry where one
   is reachable; where none is, stand-ins are made once and cached with the engine's data root:
   the base from Debian bookworm (mmdebstrap), Pulsar from the same release's jars that
   ``local/pulsar`` runs (``docker/pulsar-standin/``);
2. the project's four images, by ``docker-compose build`` with the wheels made on the host
   (``--build-arg WHEELHOUSE=docker/wheels``: the engine's namespace has no network);
3. ``docker-compose up -d``, until every container is healthy (an exited one fails at once);
4. a real session from outside the containers: the Python client (``carom-probe``) over the
   router's published ports, video from the host-networked simulator, results back;
5. ``docker-compose exec -T tracker carom-consume ... -p Earliest -n 5`` prints 5 messages;
   then one more session sends a chat and a points message over its channel streams
   (``carom_client.channels``): the recorder writes both, exactly once, into ``./recordings``;
6. one real headless Chromium page, as a user on the machine opens it (http://127.0.0.1:8000/:
   video, reports, live L2);
7. ``--scale tracker=2 --scale recorder=2`` with ``CAROM_HOST_ADDRESS`` set to the namespace's
   own address on a veth pair (the "node"): sessions split between the trackers, no frame twice;
8. a remote user: Chromium outside the namespace opens ``https://<node>:8443/`` (WebTransport and
   WebRTC to the node's address), and ``http://<node>:8000/`` says to use HTTPS;
9. ``docker-compose down -v``: no container, network or volume left.

``--cluster`` runs the same stack on a real Pulsar cluster instead (``docker-compose.cluster.yml``,
profile ``cluster``: ZooKeeper, the metadata init, 3 bookies, 2 brokers; the stand-in image runs
each from the same jars) and a reduced check: steps 1-5, then the three topics partitioned as
configured and which broker owns each partition, the metadata init run a second time (it must
change nothing and succeed), and ``down -v``. No Chromium and no scaling: those test the Carom
services, which are the same images either way. About 3 minutes warm here (179 s, 72 s of it
until all 10 containers were healthy): its own invocation, not part of CI's default run.

The tracker's CSV rows (in ``./metrics`` on the host, owned by ``CAROM_UID:CAROM_GID``) are what
the frames and L2 are counted from; the recorder's files are in ``./recordings``, owned the
same. Everything started is stopped on every path (Ctrl-C too): the containers, the engine, the
namespace. Images and build cache stay in the cache folder
(``$CAROM_COMPOSE_CACHE``, default ``~/.cache/carom/compose``) for the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carom_local import pulsar as local_pulsar

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: The override that runs the services on a Pulsar cluster (profile ``cluster``).
CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
CLUSTER_PROFILE = "cluster"
#: The cluster's long-running nodes; ``pulsar-init`` runs once and must exit 0.
CLUSTER_NODES = ("zookeeper", "bookie-0", "bookie-1", "bookie-2", "broker-0", "broker-1")
ONE_SHOT = ("pulsar-init",)
#: local/pulsar-dist/cluster/*.conf, copied into the stand-in image's conf/ as the real image
#: ships conf/zookeeper.conf, conf/bookkeeper.conf and conf/broker.conf.
CLUSTER_CONFS = ("zookeeper.conf", "bookkeeper.conf", "broker.conf")
METRICS = ROOT / "metrics"
RECORDINGS = ROOT / "recordings"
WHEELHOUSE = "docker/wheels"
STANDIN = ROOT / "docker" / "pulsar-standin"
PYTHON_IMAGE = "python:3.11-slim-bookworm"
PROJECT = "carom"
SERVICES = ("pulsar", "simulator", "router", "tracker", "recorder")
CAROM_SERVICES = SERVICES[1:]
EXTRAS = "recorder,router,simulator,tracker"
ROUTER_URL = "http://127.0.0.1:8000"
#: Marks an image this command made in place of a registry's.
STANDIN_LABEL = "org.carom.stand-in"


class CheckFailed(RuntimeError):
    """A check did not hold; the message says which and what was seen."""


def cache_dir() -> Path:
    return Path(os.environ.get("CAROM_COMPOSE_CACHE") or Path.home() / ".cache/carom/compose")


def say(text: str) -> None:
    print(f"compose-check: {text}", flush=True)


def cluster_url() -> str:
    """The service URL docker-compose.cluster.yml gives the Carom services (every broker)."""
    m = re.search(r"CAROM_TRACKER__PULSAR__URL:\s*(\S+)", CLUSTER_FILE.read_text())
    if m is None:
        raise CheckFailed("docker-compose.cluster.yml gives the tracker no pulsar.url")
    return m.group(1)


def pulsar_image() -> str:
    m = re.search(r"image:\s*(apachepulsar/pulsar:\S+)", COMPOSE_FILE.read_text())
    if m is None:
        raise CheckFailed("docker-compose.yml names no apachepulsar/pulsar image")
    return m.group(1)


# --- timings -------------------------------------------------------------------------------------


@dataclass
class Timings:
    phases: list[tuple[str, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        say(f"{name}...")
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases.append((name, time.monotonic() - start))

    def table(self) -> str:
        width = max((len(n) for n, _ in self.phases), default=5)
        lines = [f"  {n:<{width}}  {s:6.1f} s" for n, s in self.phases]
        lines.append(f"  {'total':<{width}}  {time.monotonic() - self.t0:6.1f} s")
        return "\n".join(lines)


# --- processes -----------------------------------------------------------------------------------


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    check: bool = True,
    quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (bounded); its output is returned, and shown when it fails."""
    try:
        proc = subprocess.run(
            list(argv), env=dict(env) if env is not None else None, capture_output=True,
            text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"`{' '.join(argv)}` did not end within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise CheckFailed(f"`{' '.join(argv)}` failed ({proc.returncode}):\n{tail}")
    if not quiet and proc.returncode != 0:
        say(f"`{' '.join(argv[:4])} ...` exited {proc.returncode}")
    return proc


def need(tool: str) -> str:
    path = shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{tool}", os.X_OK)), None
    )
    if path is None:
        raise CheckFailed(f"`{tool}` is missing: run local/bootstrap --compose")
    return path


def _pids_with(needle: str) -> list[int]:
    """Live processes whose command line holds ``needle`` (an engine left by a killed run)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append(int(entry.name))
    return out


def unmount_under(path: Path) -> None:
    """Lazily unmount whatever is mounted at or below ``path``, deepest first (dockerd leaves
    the bind mount of its namespace in its exec root, which would keep the namespace alive)."""
    prefix = str(path).rstrip("/")
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        run(["umount", "-l", point], check=False, quiet=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


# --- the engine ----------------------------------------------------------------------------------


class Engine:
    """A dockerd of this command's own, in a network namespace of its own.

    The namespace has only loopback: the stack's published ports, the host-networked simulator
    and the clients (run in it by ``ip netns exec``, which also mounts ``/etc/netns/<name>/hosts``
    so that ``pulsar``, the name the broker advertises, is 127.0.0.1 for them) all meet there,
    away from the host's ports. ``stop`` removes every container, the engine and the namespace.
    """

    PREFIX = "carom-compose-"
    #: The namespace is a "node" with an address of its own on a veth pair (``.2``; this side
    #: ``.1``): the host reaches the published ports and the host-networked simulator there, as a
    #: browser on another machine reaches a server (README, "Remote users").
    SUBNET = "10.231.8"

    def __init__(self, cache: Path) -> None:
        self.name = f"{self.PREFIX}{os.getpid()}"
        self.node_address = f"{self.SUBNET}.2"
        self.veth = f"cc{os.getpid()}"  # this side; its peer, in the namespace, is cn<pid>
        self.data_root = cache / "docker"
        self.state = Path("/run") / self.name
        self.sock = self.state / "docker.sock"
        self.log_path = cache / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.netns_made = False
        self.docker = next(
            (p for p in ("/usr/bin/docker",) if os.access(p, os.X_OK)), None
        ) or need("docker")

    @property
    def env(self) -> dict[str, str]:
        # The classic builder (no BuildKit here); compose builds through the engine's API.
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "0",
                "COMPOSE_DOCKER_CLI_BUILD": "0"}  # fmt: skip

    def netns(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    @classmethod
    def clear_leftovers(cls, data_root: Path) -> None:
        """What a killed earlier run left: its engine on this data root, its namespaces."""
        for pid in _pids_with(f"--data-root {data_root} "):
            say(f"stopping an engine left by an earlier run (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.3)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        names = run(["ip", "netns", "list"], quiet=True).stdout.split()
        for name in names:
            if name.startswith(cls.PREFIX) and not _alive(int(name[len(cls.PREFIX) :] or 0)):
                run(["ip", "netns", "delete", name], check=False, quiet=True)
                shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        for state in Path("/run").glob(f"{cls.PREFIX}*"):
            if not _alive(int(state.name[len(cls.PREFIX) :] or 0)):
                unmount_under(state)
                shutil.rmtree(state, ignore_errors=True)

    def start(self, timeout: float = 60.0) -> None:
        self.clear_leftovers(self.data_root)
        dockerd = need("dockerd")
        run(["ip", "netns", "add", self.name])
        self.netns_made = True
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        peer = f"cn{os.getpid()}"
        run(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", peer, "netns", self.name])
        run(["ip", "addr", "add", f"{self.SUBNET}.1/24", "dev", self.veth])
        run(["ip", "link", "set", self.veth, "up"])
        run(["ip", "-n", self.name, "addr", "add", f"{self.node_address}/24", "dev", peer])
        run(["ip", "-n", self.name, "link", "set", peer, "up"])
        hosts = Path("/etc/netns") / self.name / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        # The names the brokers advertise: the standalone's, and the cluster's two.
        hosts.write_text(
            "127.0.0.1\tlocalhost pulsar broker-0 broker-1\n::1\tlocalhost ip6-localhost\n"
        )
        self.state.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [need("nsenter"), f"--net=/var/run/netns/{self.name}", dockerd,
                 "--data-root", str(self.data_root), "--exec-root", str(self.state / "exec"),
                 "--pidfile", str(self.state / "docker.pid"), "-H", f"unix://{self.sock}",
                 "--iptables=false", "--ip6tables=false"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CheckFailed(f"dockerd exited at start:\n{self.log_tail()}")
            if self.sock.exists() and self.docker_ok():
                return
            time.sleep(0.3)
        raise CheckFailed(f"dockerd not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def docker_ok(self) -> bool:
        return run([self.docker, "info"], self.env, 10, check=False, quiet=True).returncode == 0

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def d(self, *args: str, timeout: float = 600.0, check: bool = True) -> str:
        return run([self.docker, *args], self.env, timeout, check).stdout

    def stop(self) -> None:
        """Every container, then the engine (TERM, then KILL), then the namespace."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(CheckFailed):
                ids = self.d("ps", "-aq", timeout=30, check=False).split()
                if ids:
                    self.d("rm", "-f", "-v", *ids, timeout=60, check=False)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                say("dockerd did not stop within 30 s: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            # Its containerd and shims are in its process group (start_new_session).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        unmount_under(self.state)
        if self.netns_made:
            # Deleting the namespace deletes the veth peer in it, and so the pair.
            run(["ip", "netns", "delete", self.name], check=False, quiet=True)
            self.netns_made = False
        shutil.rmtree(Path("/etc/netns") / self.name, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)


# --- images --------------------------------------------------------------------------------------


def registry_reachable(timeout: float = 5.0) -> bool:
    """Docker Hub answers (401 without a token is an answer)."""
    try:
        urllib.request.urlopen("https://registry-1.docker.io/v2/", timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, urllib.error.URLError):
        return False
    return True


def _has_image(engine: Engine, ref: str) -> bool:
    proc = run([engine.docker, "image", "inspect", ref], engine.env, 30, False, True)
    return proc.returncode == 0


def _label(engine: Engine, ref: str) -> str:
    fmt = '{{ index .Config.Labels "' + STANDIN_LABEL + '" }}'
    return engine.d("image", "inspect", "-f", fmt, ref, timeout=30, check=False).strip()


def standin_base(engine: Engine, cache: Path) -> str:
    """``python:3.11-slim-bookworm`` stand-in: bookworm minbase + Python 3.11 (mmdebstrap).

    mmdebstrap writes the tarball ``docker import`` takes, in 32 s here; debootstrap made the same
    base in 105 s (into a folder, then tar), most of a cold run's first two minutes."""
    if _has_image(engine, PYTHON_IMAGE):
        return "cached"
    tar = cache / "python-3.11-slim-bookworm.tar"
    if not tar.exists():
        partial = cache / "python-3.11-slim-bookworm.part.tar"  # mmdebstrap: format by suffix
        say("making the base image with mmdebstrap (first run only, about 35 s)")
        run([need("mmdebstrap"), "--quiet", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates",
             "bookworm", str(partial), "http://deb.debian.org/debian"], timeout=900)  # fmt: skip
        os.replace(partial, tar)
    run([engine.docker, "import", "--change", "ENV LANG=C.UTF-8", "--change",
         'CMD ["python3"]', str(tar), PYTHON_IMAGE], engine.env, 300)  # fmt: skip
    return "made"


def _standin_digest(classpath: list[str], java_home: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(STANDIN.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    for p in (ROOT / "local/pulsar-dist/standalone.conf", ROOT / "local/pulsar-dist/log4j2.xml"):
        h.update(p.read_bytes())
    for name in CLUSTER_CONFS:
        h.update(name.encode() + (ROOT / "local/pulsar-dist/cluster" / name).read_bytes())
    h.update("\n".join(sorted(classpath)).encode() + str(java_home).encode())
    return h.hexdigest()[:16]


def standin_pulsar(engine: Engine, cache: Path) -> str:
    """``apachepulsar/pulsar:<v>`` stand-in from local/pulsar's jars and a Java 21+ runtime."""
    ref = pulsar_image()
    if ref.rsplit(":", 1)[1] != local_pulsar.PULSAR_VERSION:
        raise CheckFailed(f"{ref} in docker-compose.yml, {local_pulsar.PULSAR_VERSION} in local/")
    classpath = local_pulsar.classpath().split(os.pathsep)
    java_home = Path(local_pulsar.find_java()).resolve().parent.parent
    digest = _standin_digest(classpath, java_home)
    if _has_image(engine, ref) and _label(engine, ref) == digest:
        return "cached"
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        ctx = Path(tmp)
        shutil.copy(STANDIN / "Dockerfile", ctx / "Dockerfile")
        (ctx / "bin").mkdir()
        shutil.copy(STANDIN / "pulsar", ctx / "bin" / "pulsar")
        shutil.copy(STANDIN / "apply-config-from-env.py", ctx / "bin" / "apply-config-from-env.py")
        (ctx / "conf").mkdir()
        for name in ("standalone.conf", "log4j2.xml"):
            shutil.copy(ROOT / "local/pulsar-dist" / name, ctx / "conf" / name)
        for name in CLUSTER_CONFS:
            shutil.copy(ROOT / "local/pulsar-dist/cluster" / name, ctx / "conf" / name)
        (ctx / "lib").mkdir()
        for jar in classpath:
            shutil.copy(jar, ctx / "lib" / Path(jar).name)
        skip = shutil.ignore_patterns("src.zip", "man", "include", "demo")
        shutil.copytree(java_home, ctx / "java", symlinks=True, ignore=skip)
        run([engine.docker, "build", "-q", "--label", f"{STANDIN_LABEL}={digest}",
             "-t", ref, str(ctx)], engine.env, 900)  # fmt: skip
    return "made"


def pull_images(engine: Engine) -> None:
    """The real images, pulled on the host (whose network reaches the registry) into the engine.

    The engine's namespace has no route out, so ``docker pull`` cannot work there; the images
    come as ``docker save`` archives written from the registry's API (anonymous Docker Hub
    tokens), then ``docker load``.
    """
    from carom_local import registry

    for ref in (PYTHON_IMAGE, pulsar_image()):
        if _has_image(engine, ref) and not _label(engine, ref):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "image.tar"
            registry.save(ref, archive)
            engine.d("load", "-i", str(archive), timeout=900)


# --- the wheels ----------------------------------------------------------------------------------


def wheelhouse() -> int:
    """Every wheel the four images install, made on the host (pinned by requirements.lock)."""
    out = ROOT / WHEELHOUSE
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    py = sys.executable
    # The same bytes for the same sources: the image layers stay cached between runs.
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    with tempfile.TemporaryDirectory() as build:
        run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(out), str(ROOT)],
            {**env, "TMPDIR": build}, 600)  # fmt: skip
    wheel = next(out.glob("carom-*.whl"))
    run([py, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
         "--dest", str(out), "--constraint", str(ROOT / "requirements.lock"),
         f"{wheel}[{EXTRAS}]"], env, 600)  # fmt: skip
    return len(list(out.glob("*.whl")))


# --- the stack -----------------------------------------------------------------------------------


class Stack:
    """docker-compose against the engine, as a user runs it from the repository root."""

    def __init__(self, engine: Engine, uid: int, gid: int, cluster: bool = False) -> None:
        self.engine = engine
        #: As the user types it: ``-f docker-compose.yml`` alone, or with the cluster override
        #: and its profile (docker-compose.cluster.yml, top).
        self.files = [COMPOSE_FILE, CLUSTER_FILE] if cluster else [COMPOSE_FILE]
        self.profiles = [CLUSTER_PROFILE] if cluster else []
        self.compose = need("docker-compose")
        self.env = {
            **engine.env,
            "COMPOSE_PROJECT_NAME": PROJECT,
            "CAROM_SIMULATOR_TOKEN": secrets.token_urlsafe(32),
            "CAROM_UID": str(uid),
            "CAROM_GID": str(gid),
        }
        self.up_done = False

    def dc(self, *args: str, timeout: float = 600.0, check: bool = True) -> str:
        files = [a for f in self.files for a in ("-f", str(f))]
        profiles = [a for p in self.profiles for a in ("--profile", p)]
        argv = [self.compose, "--project-directory", str(ROOT), *files, *profiles, *args]
        return run(argv, self.env, timeout, check).stdout

    def containers(self) -> list[dict[str, Any]]:
        ids = self.engine.d("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
                            timeout=30).split()  # fmt: skip
        if not ids:
            return []
        out: list[dict[str, Any]] = json.loads(self.engine.d("inspect", *ids, timeout=30))
        return out

    def wait_healthy(
        self, expect: Mapping[str, int], timeout: float, since: float | None = None
    ) -> dict[str, float]:
        """Until ``expect`` (service -> replicas) are all healthy: when each became so (seconds
        after ``since``, a monotonic time; default now)."""
        start = time.monotonic() if since is None else since
        healthy_at: dict[str, float] = {}
        seen: dict[str, str] = {}
        while time.monotonic() - start < timeout:
            counts: dict[str, int] = {}
            for c in self.containers():
                labels = c["Config"]["Labels"]
                svc = str(labels.get("com.docker.compose.service"))
                st = c["State"]
                status = str(st["Status"])
                name = str(c["Name"]).lstrip("/")
                if svc in ONE_SHOT and status == "exited" and st["ExitCode"] == 0:
                    continue  # done, as it should be (the cluster's metadata init)
                if status in ("exited", "dead", "restarting"):
                    logs = self.engine.d("logs", "--tail", "20", name, check=False)
                    raise CheckFailed(
                        f"container {name} {status} (code {st['ExitCode']}), "
                        f"its last lines:\n{logs}"
                    )
                health = st.get("Health", {}).get("Status", "none")
                seen[name] = f"{status}/{health}"
                if status == "running" and health == "healthy":
                    counts[svc] = counts.get(svc, 0) + 1
            for svc, n in expect.items():
                if counts.get(svc, 0) >= n and svc not in healthy_at:
                    healthy_at[svc] = time.monotonic() - start
            if all(counts.get(svc, 0) >= n for svc, n in expect.items()):
                return healthy_at
            time.sleep(1.0)
        raise CheckFailed(f"not healthy after {timeout:.0f} s: {seen}")

    def down(self) -> None:
        self.dc("down", "-v", "--remove-orphans", "--timeout", "20", timeout=180, check=False)
        self.up_done = False


# --- sessions and their rows ---------------------------------------------------------------------


@dataclass
class Probe:
    sessions: list[str]
    frames: int
    matched: int
    l2_mean: float
    results_ok: int
    results_due: int
    text: str


_PROBE_LINE = re.compile(
    r"^(probe-\S+) \[(\w+)\]: frames (\d+), matched to truth (\d+) .*?L2 mean ([\d.na]+) px.*"
    r"coverage (\d+)/(\d+) frames due ok",
    re.M,
)


def probe(
    engine: Engine,
    sessions: int,
    seconds: float,
    fps: float = 30.0,
    router: str = ROUTER_URL,
    pulsar_url: str = "pulsar://pulsar:6650",
) -> Probe:
    """carom-probe through the router from the engine's namespace: WebTransport over the router's
    published UDP port, WebRTC from the host-networked simulator, live results back."""
    argv = engine.netns([sys.executable, "-m", "carom_client.probe", "--router", router,
                         "--pulsar-url", pulsar_url, "-n", str(sessions),
                         "-d", str(seconds), "--fps", str(fps)])  # fmt: skip
    out = run(argv, timeout=seconds + 120, check=False)
    text = out.stdout + out.stderr
    found = _PROBE_LINE.findall(out.stdout)
    if out.returncode != 0 or len(found) != sessions:
        raise CheckFailed(f"carom-probe failed ({out.returncode}):\n{text[-3000:]}")
    frames = sum(int(f[2]) for f in found)
    matched = sum(int(f[3]) for f in found)
    l2s = [(float(f[4]), int(f[3])) for f in found if f[4] != "nan"]
    l2 = sum(v * n for v, n in l2s) / max(1, sum(n for _, n in l2s))
    return Probe([f[0] for f in found], frames, matched, l2,
                 sum(int(f[5]) for f in found), sum(int(f[6]) for f in found), text)  # fmt: skip


@dataclass
class Rows:
    """The tracker's CSV rows of some sessions, read from ./metrics on the host."""

    files: dict[str, Path]  # session -> its CSV file
    rows: int
    ok: int
    frames_twice: int
    l2_mean: float
    owners: set[tuple[int, int]]
    #: Rows by status (ok, not_detected, missed, not_sent, orphan).
    statuses: dict[str, int] = field(default_factory=dict)


def read_rows(sessions: Sequence[str], folders: Sequence[Path]) -> Rows:
    files: dict[str, Path] = {}
    for sid in sessions:
        found = [f / f"{sid}.csv" for f in folders if (f / f"{sid}.csv").exists()]
        if len(found) != 1:
            raise CheckFailed(f"session {sid}: {len(found)} CSV files in {list(map(str, folders))}")
        files[sid] = found[0]
    rows = ok = twice = 0
    l2: list[float] = []
    owners: set[tuple[int, int]] = set()
    statuses: dict[str, int] = {}
    for path in files.values():
        st = path.stat()
        owners.add((st.st_uid, st.st_gid))
        seen: set[str] = set()
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                rows += 1
                status = row.get("status") or "?"
                statuses[status] = statuses.get(status, 0) + 1
                frame = row.get("frame") or ""
                twice += frame in seen
                seen.add(frame)
                if row.get("status") == "ok":
                    ok += 1
                    if row.get("l2_px"):
                        l2.append(float(row["l2_px"]))
    mean = sum(l2) / len(l2) if l2 else math.nan
    return Rows(files, rows, ok, twice, mean, owners, statuses)


def wait_rows(
    sessions: Sequence[str], folders: Sequence[Path], at_least: int, timeout: float = 30.0
) -> Rows:
    """The rows once there are ``at_least`` (the tracker writes as frames complete)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = read_rows(sessions, folders)
            if rows.rows >= at_least or time.monotonic() > deadline:
                return rows
        except CheckFailed:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def new_folders(before: set[Path]) -> list[Path]:
    return sorted(p for p in METRICS.iterdir() if p.is_dir() and p not in before)


# --- the recorder --------------------------------------------------------------------------------

#: What the channel session sends: one chat message, and one points message of this many points.
CHAT_TEXT = "compose-check: chat through the router to the recorder"
POINTS = 100


def channels_main(argv: Sequence[str]) -> int:
    """``... compose_check channels``: one session (run inside the namespace) that says hello,
    sends a chat and a points message on its channel streams, and says bye once the router has
    them (``ChannelSender.finish``). Prints its session id as JSON."""
    import asyncio

    import numpy as np

    from carom import protocol as p
    from carom_client.channels import ChannelSender
    from carom_client.session import RouterInfo
    from carom_client.webtransport import connect

    parser = argparse.ArgumentParser(prog="compose_check channels")
    parser.add_argument("--router", default=ROUTER_URL)
    a = parser.parse_args(argv)
    sid = f"compose-ch-{secrets.token_hex(4)}"
    errors: list[str] = []

    async def session() -> bool:
        info = await RouterInfo.fetch(a.router)
        wt = await connect(info.webtransport_url, cert_sha256=info.cert_sha256)
        control = wt.open_stream()
        control.write(p.frame(p.Hello(session_id=sid, client="compose-check")))
        welcomed = asyncio.Event()

        async def read() -> None:
            reader = p.FrameReader()
            async for chunk in control:
                for body in reader.feed(chunk):
                    msg = p.parse_router(body)
                    if isinstance(msg, p.Welcome):
                        welcomed.set()
                    elif isinstance(msg, p.Ping):  # answered: the clock capture times convert by
                        control.write(p.frame(p.Pong(id=msg.id, t_client_ms=time.time_ns() / 1e6)))
                    elif isinstance(msg, p.Error):
                        errors.append(f"{msg.code}: {msg.message}")

        task = asyncio.get_running_loop().create_task(read())
        try:
            await asyncio.wait_for(welcomed.wait(), 15)
            await asyncio.sleep(0.5)  # a few pings first: the session's clock offset
            sender = ChannelSender(wt)
            sender.send("chat", CHAT_TEXT.encode())
            points = np.arange(POINTS * 3, dtype="<f4").reshape(POINTS, 3)
            sender.send("points", points.tobytes(), {"count": POINTS})
            acked = await sender.finish(30)
            control.write(p.frame(p.Bye()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(wt.closed), 10)
            return acked
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                await wt.close()

    acked = asyncio.run(session())
    print(json.dumps({"ok": acked and not errors, "session_id": sid, "errors": errors}), flush=True)
    return 0 if acked and not errors else 1


def channel_session(engine: Engine) -> str:
    """The channel session, from the engine's namespace: its session id."""
    argv = engine.netns([sys.executable, "-m", "carom_local.compose_check", "channels"])
    out = run(argv, timeout=120, check=False)
    last = (out.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        result: dict[str, Any] = json.loads(last)
    except ValueError:
        result = {}
    if out.returncode != 0 or not result.get("ok"):
        raise CheckFailed(f"the channel session failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return str(result["session_id"])


def wait_recording(sid: str, timeout: float = 60.0) -> dict[str, Any]:
    """The recorder's files of the channel session once both types are finalized (their
    ``ChannelEnd`` came): what was sent, once, in the right files, owned by whom."""
    import numpy as np

    folder = RECORDINGS / sid
    summaries = {t: folder / f"{t}.summary.json" for t in ("chat", "points")}
    deadline = time.monotonic() + timeout
    while not all(s.exists() for s in summaries.values()):
        if time.monotonic() > deadline:
            found = sorted(str(f.relative_to(RECORDINGS)) for f in RECORDINGS.rglob("*"))
            raise CheckFailed(f"the recorder did not finalize {sid} within {timeout:.0f} s; "
                              f"./recordings holds {found[:40]}")  # fmt: skip
        time.sleep(0.5)
    verdicts = {t: json.loads(s.read_text()) for t, s in summaries.items()}
    for t, v in verdicts.items():
        if not v.get("exactly_once") or v.get("received") != 1:
            raise CheckFailed(f"the recorder's {t} of {sid}: {v}")
    lines = (folder / "chat.jsonl").read_text().splitlines()
    texts = [json.loads(line).get("text") for line in lines if line.strip()]
    if texts != [CHAT_TEXT]:
        raise CheckFailed(f"{folder / 'chat.jsonl'} holds {texts}, not [{CHAT_TEXT!r}]")
    arrays = sorted((folder / "points").glob("*.npy"))
    want = np.arange(POINTS * 3, dtype="<f4").reshape(POINTS, 3)
    if len(arrays) != 1 or not np.array_equal(np.load(arrays[0]), want):
        raise CheckFailed(f"{folder / 'points'} holds {[a.name for a in arrays]}, not the points")
    owners = {(f.stat().st_uid, f.stat().st_gid) for f in [folder, *folder.rglob("*")]}
    return {"verdicts": verdicts, "owners": owners}


def hops(summary: Mapping[str, Any]) -> str:
    """A recorder summary's latency per hop, p50 (``capture_to_router 2.96 ms, ...``)."""
    lat = summary.get("latency_ms") or {}
    return (
        ", ".join(f"{hop} {v.get('p50_ms')} ms" for hop, v in lat.items() if isinstance(v, dict))
        or "none"
    )


# --- the page ------------------------------------------------------------------------------------


def page_main(argv: Sequence[str]) -> int:
    """``... compose_check page``: one headless Chromium page (run inside the namespace)."""
    import asyncio

    from carom_client.chromium import run_pages

    p = argparse.ArgumentParser(prog="compose_check page")
    p.add_argument("--router", default=ROUTER_URL)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    a = p.parse_args(argv)
    results = asyncio.run(run_pages(a.router, 1, a.duration, {"fps": 30}))
    r = results[0]
    print(r.line(), flush=True)
    print(json.dumps({
        "ok": r.ok, "error": r.error, "codec": r.codec, "fps": r.fps, "reported": r.reported,
        "results": r.results, "missed": r.missed, "live_l2_mean": r.live_l2_mean,
        "session_id": r.session_id,
    }), flush=True)  # fmt: skip
    return 0 if r.ok else 1


def chromium_page(engine: Engine, seconds: float) -> dict[str, object]:
    argv = engine.netns([sys.executable, "-m", "carom_local.compose_check", "page",
                         "-d", str(seconds)])  # fmt: skip
    out = run(argv, timeout=seconds + 120, check=False)
    last = (out.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        result: dict[str, object] = json.loads(last)
    except ValueError:
        result = {}
    if out.returncode != 0 or not result.get("ok"):
        raise CheckFailed(f"the Chromium page failed:\n{(out.stdout + out.stderr)[-3000:]}")
    result["line"] = out.stdout.strip().splitlines()[0]
    return result


def remote_page(node: str, seconds: float, shots: Path) -> dict[str, Any]:
    """From this side of the veth, as a browser on another machine: the page over HTTPS at the
    node's address (its self-signed certificate accepted, as a user does once), streaming; and
    over plain HTTP, which is no secure context: the page must say so and name the HTTPS URL."""
    import asyncio

    from playwright.async_api import async_playwright

    from carom_client import chromium

    https, http = f"https://{node}:8443", f"http://{node}:8000"

    async def plain_http() -> dict[str, Any]:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=chromium.CHROMIUM, headless=True, args=chromium.FLAGS
            )
            try:
                page = await browser.new_page()
                await page.goto(f"{http}/")
                await page.wait_for_function("carom.state === 'error'", timeout=30_000)
                got: dict[str, Any] = await page.evaluate(
                    "({secure: window.isSecureContext, wt: typeof WebTransport,"
                    " shown: document.getElementById('message').textContent})"
                )
                await page.screenshot(path=shots / "not-secure.png")
                return got
            finally:
                await browser.close()

    async def both() -> tuple[chromium.PageResult, dict[str, Any]]:
        [page] = await chromium.run_pages(
            https, 1, seconds, {"fps": 30}, screenshots=shots,
            extra_flags=["--ignore-certificate-errors"],
        )  # fmt: skip
        return page, await plain_http()

    shots.mkdir(parents=True, exist_ok=True)
    page, plain = asyncio.run(both())
    if not page.ok or page.coverage is None or page.session_id is None:
        raise CheckFailed(f"the remote page over {https}/ failed: {page.line()}")
    want = f"Not a secure context: this page is plain HTTP from {node}"
    if (
        plain["secure"] is not False
        or not str(plain["shown"]).startswith(want)
        or (f"Use {https}/ instead" not in str(plain["shown"]))
    ):
        raise CheckFailed(f"{http}/ did not say to use {https}/: {plain}")
    return {"page": page, "plain": plain["shown"]}


# --- the cluster ---------------------------------------------------------------------------------


def cluster_partitions() -> int:
    """The partition count docker-compose.cluster.yml gives the Carom services."""
    m = re.search(r'CAROM_TRACKER__PULSAR__PARTITIONS:\s*"?(\d+)', CLUSTER_FILE.read_text())
    if m is None:
        raise CheckFailed("docker-compose.cluster.yml gives the tracker no pulsar.partitions")
    return int(m.group(1))


def topics_main(argv: Sequence[str]) -> int:
    """``... compose_check topics``: (run inside the namespace) each Carom topic's partition count
    and, per partition, the broker that owns it (a lookup through the admin API), as JSON."""
    from urllib.parse import urlsplit

    from carom_runtime.config import TopicNames

    parser = argparse.ArgumentParser(prog="compose_check topics")
    parser.add_argument("--admin", default="http://127.0.0.1:8080")
    a = parser.parse_args(argv)

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"{a.admin}{path}", timeout=10) as resp:
            return json.loads(resp.read().decode() or "null")

    out: dict[str, Any] = {}
    names = TopicNames()
    for topic in (names.truth, names.centroids, names.errors):
        path = topic.replace("://", "/", 1)
        count = int((get(f"/admin/v2/{path}/partitions") or {}).get("partitions", 0))
        owners: dict[str, int] = {}
        for i in range(count):
            url = str(get(f"/lookup/v2/topic/{path}-partition-{i}").get("brokerUrl", "?"))
            owner = urlsplit(url).netloc or url
            owners[owner] = owners.get(owner, 0) + 1
        out[topic.rsplit("/", 1)[-1]] = {"partitions": count, "owners": owners}
    print(json.dumps(out), flush=True)
    return 0


def cluster_topics(engine: Engine) -> dict[str, Any]:
    """The Carom topics as the cluster has them (``topics_main``, from the engine's namespace)."""
    argv = engine.netns([sys.executable, "-m", "carom_local.compose_check", "topics"])
    out = run(argv, timeout=120, check=False)
    try:
        result: dict[str, Any] = json.loads((out.stdout.strip().splitlines() or ["{}"])[-1])
    except ValueError:
        result = {}
    if out.returncode != 0 or not result:
        raise CheckFailed(f"reading the topics failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return result


# --- the whole check -----------------------------------------------------------------------------


@dataclass
class Options:
    images: str = "auto"  # auto | stand-in | registry
    seconds: float = 10.0
    chromium: bool = True
    keep_metrics: bool = False
    #: Where the remote page's screenshots go (page-0.png, not-secure.png).
    screenshots: Path = ROOT / "test-artifacts" / "compose-remote"
    #: On a Pulsar cluster (docker-compose.cluster.yml), with the reduced check (module doc).
    cluster: bool = False


def metrics_owner() -> tuple[int, int]:
    """CAROM_UID/CAROM_GID as given, else whoever owns ./metrics (the tracker writes as them)."""
    METRICS.mkdir(exist_ok=True)
    st = METRICS.stat()
    return int(os.environ.get("CAROM_UID", st.st_uid)), int(os.environ.get("CAROM_GID", st.st_gid))


def recordings_folder(uid: int, gid: int) -> bool:
    """./recordings for the recorder, owned by ``uid:gid`` if made here (Docker would make a
    missing bind-mount source root's): whether it was made."""
    if RECORDINGS.exists():
        return False
    RECORDINGS.mkdir()
    os.chown(RECORDINGS, uid, gid)
    return True


def check(opts: Options) -> int:
    if os.geteuid() != 0:
        raise CheckFailed("needs root (a network namespace and a Docker engine of its own)")
    for tool in ("ip", "nsenter", "dockerd", "docker-compose"):
        need(tool)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    t = Timings()
    lock = (cache / "lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CheckFailed(f"another compose-check is using {cache}") from None
    engine = Engine(cache)
    uid, gid = metrics_owner()
    made_recordings = recordings_folder(uid, gid)
    stack: Stack | None = None
    created: list[Path] = []
    recorded: list[Path] = []
    report: list[str] = []
    try:
        with t.phase("engine (dockerd in netns " + engine.name + ")"):
            engine.start()
        use_registry = opts.images == "registry" or (opts.images == "auto" and registry_reachable())
        if use_registry:
            with t.phase("images from the registry"):
                pull_images(engine)
            report.append(f"base images: {PYTHON_IMAGE} and {pulsar_image()} from Docker Hub")
        else:
            with t.phase("stand-in base image (python)"):
                how = standin_base(engine, cache)
            with t.phase("stand-in Pulsar image"):
                how2 = standin_pulsar(engine, cache)
            report.append(f"base images: no registry, stand-ins ({PYTHON_IMAGE} {how}, "
                          f"{pulsar_image()} {how2})")  # fmt: skip
        with t.phase("wheels on the host"):
            n = wheelhouse()
        report.append(f"wheelhouse: {n} wheels in {WHEELHOUSE}")
        stack = Stack(engine, uid, gid, cluster=opts.cluster)
        # Where the clients outside the containers find Pulsar (names mapped to the namespace's
        # loopback, as for a tool on the host).
        pulsar_url = cluster_url() if opts.cluster else "pulsar://pulsar:6650"
        expected = (
            dict.fromkeys((*CLUSTER_NODES, *CAROM_SERVICES), 1)
            if opts.cluster
            else dict.fromkeys(SERVICES, 1)
        )
        with t.phase("docker-compose build (4 images)"):
            # In parallel: most of each build is its own pip install, I/O as much as CPU.
            stack.dc("build", "--parallel", "--build-arg", f"WHEELHOUSE={WHEELHOUSE}",
                     timeout=1200)  # fmt: skip
        before = {p for p in METRICS.iterdir() if p.is_dir()}
        with t.phase("docker-compose up -d, until healthy"):
            stack.up_done = True
            up_at = time.monotonic()
            # docker-compose itself waits for Pulsar's health (the others depend on it); on the
            # cluster, for ZooKeeper, the metadata init, the bookies, then the brokers.
            stack.dc("up", "-d", timeout=600 if opts.cluster else 300)
            healthy = stack.wait_healthy(expected, timeout=420 if opts.cluster else 240,
                                         since=up_at)  # fmt: skip
        if opts.cluster:
            cids = stack.engine.d("ps", "-aq", "--filter", "label=com.docker.compose.service="
                                  "pulsar", timeout=30).split()  # fmt: skip
            if cids:
                raise CheckFailed(f"the standalone broker has containers on the cluster: {cids}")
        report.append("healthy after (s): " + ", ".join(f"{k} {v:.0f}" for k, v in healthy.items()))

        with t.phase(f"session: carom-probe, 2 x {opts.seconds:.0f} s"):
            p1 = probe(engine, 2, opts.seconds, pulsar_url=pulsar_url)
            created = new_folders(before)
            r1 = wait_rows(p1.sessions, created, at_least=p1.frames)
        if r1.owners != {(uid, gid)}:
            raise CheckFailed(f"CSV files owned by {r1.owners}, not {uid}:{gid}")
        if r1.ok < 0.9 * p1.frames or r1.frames_twice or not (r1.l2_mean < 0.5):
            raise CheckFailed(f"rows: {r1}")
        if p1.results_ok < 0.9 * p1.frames:
            raise CheckFailed(f"results back at the client: {p1.results_ok} of {p1.frames}")
        report.append(
            f"session (Python client, 2 x {opts.seconds:.0f} s): {p1.frames} frames decoded, "
            f"{p1.matched} matched to truth, client L2 mean {p1.l2_mean:.3f} px; tracker CSV "
            f"rows {r1.rows} ({r1.statuses}), L2 mean {r1.l2_mean:.4f} px, no frame twice, files "
            f"owned by {uid}:{gid}; results back at the client {p1.results_ok}/{p1.results_due}"
        )

        with t.phase("docker-compose exec -T tracker carom-consume -n 5"):
            url = cluster_url() if opts.cluster else "pulsar://pulsar:6650"
            out = stack.dc("exec", "-T", "tracker", "carom-consume", "--url", url, "truth",
                           "-p", "Earliest", "-n", "5", timeout=90)  # fmt: skip
            got = out.count("----- got message -----")
            if got != 5:
                raise CheckFailed(f"carom-consume printed {got} messages, not 5:\n{out[-2000:]}")
        report.append("carom-consume in the tracker's container: 5 messages")

        with t.phase("channel session: chat + points, until the recorder wrote them"):
            sid = channel_session(engine)
            recorded.append(RECORDINGS / sid)
            rec = wait_recording(sid)
        if rec["owners"] != {(uid, gid)}:
            raise CheckFailed(f"recordings owned by {rec['owners']}, not {uid}:{gid}")
        report.append(f"recorder: chat and {POINTS} points of {sid} in ./recordings/{sid}, "
                      f"each exactly once, files owned by {uid}:{gid}; points latency "
                      f"{hops(rec['verdicts']['points'])}")  # fmt: skip

        if opts.cluster:
            want = cluster_partitions()
            with t.phase("the topics: partitions and their brokers"):
                topics = cluster_topics(engine)
            if any(v["partitions"] != want for v in topics.values()):
                raise CheckFailed(f"topics not partitioned {want} ways: {topics}")
            owners = {
                name: ", ".join(f"{b}: {n}" for b, n in sorted(v["owners"].items()))
                for name, v in topics.items()
            }
            report.append("topics (partitions; owning broker: partitions): " + "; ".join(
                f"{name} {v['partitions']} ({owners[name]})" for name, v in topics.items()
            ))  # fmt: skip
            with t.phase("pulsar-init run again (must change nothing and succeed)"):
                stack.dc("run", "-T", "--rm", "--no-deps", "pulsar-init", timeout=180)
            report.append("pulsar-init run a second time: exit 0")

        if opts.chromium and not opts.cluster:
            with t.phase(f"Chromium page, {opts.seconds:.0f} s"):
                page = chromium_page(engine, opts.seconds)
            report.append(f"Chromium page: {page['line']}")

        # The cluster's check stops here (module doc): scaling and the pages test the Carom
        # services, which are the same images on either Pulsar.
        if not opts.cluster:
            # From here on as for remote users (README, "Remote users"): CAROM_HOST_ADDRESS is the
            # node's address, so the router's ports are published there and the simulator's ICE
            # candidates carry it; compose recreates those two (the tracker and Pulsar stay).
            node = engine.node_address
            with t.phase(f"--scale tracker=2 --scale recorder=2 and CAROM_HOST_ADDRESS={node}, "
                         "until healthy"):  # fmt: skip
                stack.env["CAROM_HOST_ADDRESS"] = node
                up_at = time.monotonic()
                stack.dc("up", "-d", "--scale", "tracker=2", "--scale", "recorder=2", timeout=300)
                stack.wait_healthy(
                    {**dict.fromkeys(SERVICES, 1), "tracker": 2, "recorder": 2},
                    timeout=180,
                    since=up_at,
                )
            # Key_Shared hashes each session's key onto one of the two trackers: 4 random sessions
            # all land on one in 1 of 8 batches, so up to 3 batches (1 in 512 all on one).
            sessions: list[str] = []
            frames = batches = 0
            by_folder: dict[str, int] = {}
            with t.phase(f"sessions with 2 trackers: carom-probe, 4 x {opts.seconds:.0f} s"):
                while batches < 3 and len(by_folder) < 2:
                    batches += 1
                    p2 = probe(engine, 4, opts.seconds, router=f"http://{node}:8000")
                    sessions += p2.sessions
                    frames += p2.frames
                    created = new_folders(before)
                    r2 = wait_rows(sessions, created, at_least=frames)
                    by_folder = {}
                    for f in r2.files.values():
                        by_folder[f.parent.name] = by_folder.get(f.parent.name, 0) + 1
            if len(by_folder) != 2 or r2.frames_twice or r2.ok < 0.9 * frames:
                raise CheckFailed(f"2 trackers: sessions per run folder {by_folder}, "
                                  f"{r2.frames_twice} frames twice, {r2.ok} rows ok of "
                                  f"{frames} frames decoded")  # fmt: skip
            report.append(
                f"--scale tracker=2 ({batches} x 4 x {opts.seconds:.0f} s): sessions per tracker "
                f"{sorted(by_folder.values())}, {frames} frames decoded, {r2.rows} rows "
                f"({r2.statuses}), L2 mean "
                f"{r2.l2_mean:.4f} px, no frame twice"
            )

            if opts.chromium:
                with t.phase(f"remote Chromium page, https://{node}:8443/, {opts.seconds:.0f} s"):
                    remote = remote_page(node, opts.seconds, opts.screenshots)
                    got = remote["page"]
                    created = new_folders(before)
                    r3 = wait_rows([got.session_id], created, at_least=got.coverage.due)
                # The page counts what the tracker sent back: the same frames, the same outcome.
                if (r3.rows, r3.ok) != (got.coverage.due, got.coverage.ok) or r3.frames_twice:
                    raise CheckFailed(f"the remote page's rows: {r3} ({got.line()})")
                report.append(f"remote Chromium page (outside the node, https://{node}:8443/): "
                              f"{got.line()}; tracker CSV rows {r3.rows} ({r3.ok} ok); screenshot "
                              f"{opts.screenshots / 'page-0.png'}")  # fmt: skip
                report.append(f"plain http://{node}:8000/ from outside: {remote['plain']}")

        with t.phase("docker-compose down -v"):
            stack.down()
            networks = engine.d("network", "ls", "--format", "{{.Name}}").split()
            left = {
                "containers": engine.d("ps", "-aq").split(),
                "networks": [n for n in networks if n not in ("bridge", "host", "none")],
                "volumes": engine.d("volume", "ls", "-q").split(),
            }
            if any(left.values()):
                raise CheckFailed(f"docker-compose down -v left {left}")
        report.append("down -v: no container, network or volume left")
        with t.phase("dangling images pruned"):
            # Each build leaves the image it replaced behind, untagged: 54 GB of them had piled
            # up in the cache after some hundred runs here, and the disk this fills is the one
            # the local broker's bookie refuses to write to once it is 95% used. The images in
            # use keep their tags, so the next build's cache is untouched.
            freed = engine.d("image", "prune", "--force", timeout=600).strip().splitlines()
        report.append(f"dangling images pruned: {freed[-1] if freed else 'none'}")
    finally:
        if stack is not None and stack.up_done:
            with contextlib.suppress(CheckFailed):
                stack.down()
        with t.phase("engine stopped, namespace removed"):
            engine.stop()
        if created and not opts.keep_metrics:
            for folder in created:
                shutil.rmtree(folder, ignore_errors=True)
        if not opts.keep_metrics:
            for folder in recorded:
                shutil.rmtree(folder, ignore_errors=True)
            if made_recordings:
                with contextlib.suppress(OSError):
                    RECORDINGS.rmdir()  # only if empty
        lock.close()
        for line in report:
            print(f"  {line}", flush=True)
        print("compose-check: timings", flush=True)
        print(t.table(), flush=True)
    print("compose-check: passed", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["page"]:
        return page_main(args[1:])
    if args[:1] == ["channels"]:
        return channels_main(args[1:])
    if args[:1] == ["topics"]:
        return topics_main(args[1:])
    p = argparse.ArgumentParser(prog="local/compose-check", description=__doc__.splitlines()[0])
    p.add_argument("--images", choices=["auto", "stand-in", "registry"], default="auto",
                   help="base images: from Docker Hub where it answers (auto), or stand-ins "
                   "made here")  # fmt: skip
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per session")
    p.add_argument("--no-chromium", action="store_true", help="leave out the Chromium page")
    p.add_argument("--keep-metrics", action="store_true",
                   help="keep the run folders the trackers wrote in ./metrics, and the "
                   "recorder's session folder in ./recordings")  # fmt: skip
    p.add_argument("--cluster", action="store_true",
                   help="on a Pulsar cluster (docker-compose.cluster.yml, profile cluster), with "
                   "a reduced check: sessions, topics, the metadata init again; no Chromium, no "
                   "scaling")  # fmt: skip
    a = p.parse_args(args)

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return check(
            Options(a.images, a.duration, not a.no_chromium, a.keep_metrics, cluster=a.cluster)
        )
    except CheckFailed as exc:
        print(f"compose-check: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("compose-check: interrupted; everything it started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
