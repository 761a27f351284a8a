"""A real multi-process Apache Pulsar cluster on this machine, from the standalone's own jars.

``local/pulsar cluster start|stop|status|kill NODE|restart NODE|logs NODE|reset``: one ZooKeeper
(the metadata store), three BookKeeper bookies and two Pulsar brokers, each its own JVM, all on
127.0.0.1. Ledgers are written with ensemble 3, write quorum 2 and ack quorum 2
(``local/pulsar-dist/cluster/broker.conf``), so any one bookie may die without losing an
acknowledged message, and either broker takes over the other's topics.

The jars are the ones ``local/pulsar`` already resolves (``pulsar-broker`` depends on ZooKeeper's
``QuorumPeerMain`` and BookKeeper's ``server.Main``): no new download. The configuration is
``local/pulsar-dist/cluster/*.conf``; each node's own keys (ports, folders, the metadata store's
address) are added here, and the files each node runs with are written to its folder under
``local/.pulsar/cluster/``. Ports are chosen not to collide with the standalone broker, so both can
run at once (the test suite's standalone and a cluster test, say):

    ZooKeeper 2190, bookies 3190-3192, brokers 6660-6661 (admin 8090-8091)

Start order is the one Pulsar's bare-metal guide gives: ZooKeeper, the cluster's metadata
(``PulsarClusterMetadataSetup``, once: it also creates ``public/default`` and BookKeeper's ledger
root), the bookies, the brokers. Ready means every broker lists ``public/default`` and sees every
other broker as active. Standard library only, like ``carom_local.pulsar``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from carom_local import pulsar as standalone

HOST: Final = standalone.HOST
CLUSTER: Final = "carom"
CONF_DIR: Final = standalone.DIST_DIR / "cluster"
STATE: Final = standalone.STATE_DIR / "cluster"

ZK_PORT: Final = 2190
BOOKIE_PORT: Final = 3190
BROKER_PORT: Final = 6660
ADMIN_PORT: Final = 8090
BOOKIES: Final = 3
BROKERS: Final = 2

#: Heap and direct memory per role: about 2.3 GB for the six JVMs.
MEMORY: Final = {
    "zookeeper": ["-Xms64m", "-Xmx128m"],
    "bookie": ["-Xms128m", "-Xmx256m", "-XX:MaxDirectMemorySize=256m"],
    "broker": standalone.JVM_MEMORY,
}
MAIN: Final = {
    "zookeeper": "org.apache.zookeeper.server.quorum.QuorumPeerMain",
    "bookie": "org.apache.bookkeeper.server.Main",
    "broker": "org.apache.pulsar.PulsarBrokerStarter",
}


class ClusterError(standalone.PulsarError):
    """A one-line, user-facing reason why the cluster cannot be provided."""


@dataclass(frozen=True)
class Node:
    """One process of the cluster: its role, its name and the port it serves on."""

    role: str
    name: str
    port: int
    admin_port: int = 0

    @property
    def home(self) -> Path:
        return STATE / self.name

    @property
    def conf(self) -> Path:
        return self.home / f"{self.role}.conf"

    @property
    def log(self) -> Path:
        return self.home / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"


ZOOKEEPER: Final = Node("zookeeper", "zookeeper", ZK_PORT)
BOOKIE_NODES: Final = tuple(Node("bookie", f"bookie-{i}", BOOKIE_PORT + i) for i in range(BOOKIES))
BROKER_NODES: Final = tuple(
    Node("broker", f"broker-{i}", BROKER_PORT + i, ADMIN_PORT + i) for i in range(BROKERS)
)
NODES: Final = (ZOOKEEPER, *BOOKIE_NODES, *BROKER_NODES)
METADATA_STORE: Final = f"zk:{HOST}:{ZK_PORT}"
SERVICE_URL: Final = "pulsar://" + ",".join(f"{HOST}:{b.port}" for b in BROKER_NODES)
ADMIN_URLS: Final = tuple(f"http://{HOST}:{b.admin_port}" for b in BROKER_NODES)


@dataclass(frozen=True)
class Cluster:
    """How to reach the cluster: the service URL lists every broker (clients try each in turn)."""

    service_url: str
    admin_url: str
    admin_urls: tuple[str, ...]
    started_here: bool


def node(name: str) -> Node:
    for n in NODES:
        if n.name == name:
            return n
    raise ClusterError(f"no node {name!r}: the nodes are {', '.join(n.name for n in NODES)}")


# --- configuration (pure) ------------------------------------------------------------------------


def read_conf(path: Path) -> dict[str, str]:
    """A ``key=value`` file as a dict (comments and blank lines skipped; later keys win)."""
    conf: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ClusterError(f"{path}: not a key=value line: {raw!r}")
            conf[key.strip()] = value.strip()
    return conf


def node_keys(n: Node) -> dict[str, str]:
    """The keys that differ from node to node (the rest is the role's file)."""
    if n.role == "zookeeper":
        return {
            "dataDir": str(n.home / "data"),
            "clientPort": str(n.port),
            "clientPortAddress": HOST,
        }
    if n.role == "bookie":
        return {
            "bookiePort": str(n.port),
            "journalDirectories": str(n.home / "journal"),
            "ledgerDirectories": str(n.home / "ledgers"),
            "metadataServiceUri": f"zk+null://{HOST}:{ZK_PORT}/ledgers",
        }
    return {
        "brokerServicePort": str(n.port),
        "webServicePort": str(n.admin_port),
        "metadataStoreUrl": METADATA_STORE,
        "configurationMetadataStoreUrl": METADATA_STORE,
    }


def quorum_keys(ensemble: int, write: int, ack: int) -> dict[str, str]:
    """broker.conf's replication keys; BookKeeper's rule ensemble >= write >= ack >= 1."""
    if not ensemble >= write >= ack >= 1:
        raise ClusterError(
            f"need ensemble >= write quorum >= ack quorum >= 1: {ensemble, write, ack}"
        )
    if ensemble > BOOKIES:
        raise ClusterError(
            f"an ensemble of {ensemble} needs {ensemble} bookies; there are {BOOKIES}"
        )
    return {
        "managedLedgerDefaultEnsembleSize": str(ensemble),
        "managedLedgerDefaultWriteQuorum": str(write),
        "managedLedgerDefaultAckQuorum": str(ack),
    }


def write_overrides(keys: dict[str, str]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "broker-overrides.conf").write_text("".join(f"{k}={v}\n" for k, v in keys.items()))


def overrides(n: Node) -> dict[str, str]:
    """Keys ``start(quorum=...)`` set for this cluster's brokers (none: broker.conf as it is)."""
    path = STATE / "broker-overrides.conf"
    return read_conf(path) if n.role == "broker" and path.exists() else {}


def render_conf(n: Node) -> str:
    """The file node ``n`` runs with: its role's file, this cluster's overrides, its own keys."""
    conf = read_conf(CONF_DIR / f"{n.role if n.role != 'bookie' else 'bookkeeper'}.conf")
    conf.update(overrides(n))
    conf.update(node_keys(n))
    head = f"# Written by local/pulsar cluster from {CONF_DIR}; edit that, not this.\n"
    return head + "".join(f"{k}={v}\n" for k, v in conf.items())


def command(n: Node, java: str, cp: str) -> list[str]:
    log4j = f"-Dlog4j.configurationFile={standalone.DIST_DIR / 'log4j2.xml'}"
    base = [java, *MEMORY[n.role], *standalone.JVM_COMMON, log4j, "-cp", cp, MAIN[n.role]]
    if n.role == "zookeeper":
        return [*base, str(n.conf)]
    if n.role == "bookie":
        return [*base, "--conf", str(n.conf)]
    return [*base, "--broker-conf", str(n.conf)]


def metadata_command(java: str, cp: str) -> list[str]:
    """``PulsarClusterMetadataSetup``: the cluster, its brokers' URLs, public/default, /ledgers."""
    return [
        java,
        *MEMORY["zookeeper"],
        *standalone.JVM_COMMON,
        f"-Dlog4j.configurationFile={standalone.DIST_DIR / 'log4j2.xml'}",
        "-cp",
        cp,
        "org.apache.pulsar.PulsarClusterMetadataSetup",
        "--cluster",
        CLUSTER,
        "--metadata-store",
        METADATA_STORE,
        "--configuration-metadata-store",
        METADATA_STORE,
        "--web-service-url",
        "http://" + ",".join(f"{HOST}:{b.admin_port}" for b in BROKER_NODES),
        "--broker-service-url",
        SERVICE_URL,
        "--default-namespace-bundle-number",
        read_conf(CONF_DIR / "broker.conf").get("defaultNumberOfNamespaceBundles", "4"),
    ]


# --- probing -------------------------------------------------------------------------------------


_port_open = standalone._port_open


def zookeeper_ok() -> bool:
    """ZooKeeper's ``ruok``: ``imok`` once it serves."""
    try:
        with socket.create_connection((HOST, ZK_PORT), timeout=1.0) as s:
            s.sendall(b"ruok")
            return s.recv(4) == b"imok"
    except OSError:
        return False


def _get_json(url: str, timeout: float = 2.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def active_brokers(admin_url: str) -> list[str]:
    """The brokers ``admin_url``'s broker sees as active in the cluster (``host:port`` each)."""
    try:
        got = _get_json(f"{admin_url}/admin/v2/brokers/{CLUSTER}")
    except (OSError, ValueError, urllib.error.URLError):
        return []
    return [str(b) for b in got] if isinstance(got, list) else []


def broker_ready(admin_url: str) -> bool:
    return standalone.is_ready(admin_url) and len(active_brokers(admin_url)) == BROKERS


def pid(n: Node) -> int | None:
    try:
        value = int(n.pid_file.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(value, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return value


def node_up(n: Node) -> bool:
    if n.role == "zookeeper":
        return zookeeper_ok()
    if n.role == "bookie":
        return _port_open(n.port)
    return standalone.is_ready(f"http://{HOST}:{n.admin_port}")


def log_tail(n: Node, lines: int = 8) -> str:
    try:
        return "\n".join(n.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- lifecycle -----------------------------------------------------------------------------------


def _launch(n: Node, java: str, cp: str) -> int:
    n.home.mkdir(parents=True, exist_ok=True)
    n.conf.write_text(render_conf(n))
    with open(n.log, "ab") as log:
        proc = subprocess.Popen(
            command(n, java, cp),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=n.home,
            start_new_session=True,  # its own group: `kill` and `stop` reach the whole JVM
        )
    n.pid_file.write_text(str(proc.pid))
    return proc.pid


def _wait(what: str, ok: Callable[[], bool], nodes: list[Node], deadline: float) -> None:
    while time.monotonic() < deadline:
        if ok():
            return
        for n in nodes:
            if pid(n) is None:
                raise ClusterError(f"{n.name} exited during start-up; its log ends:\n{log_tail(n)}")
        time.sleep(0.25)
    tails = "\n".join(f"--- {n.name}\n{log_tail(n)}" for n in nodes)
    raise ClusterError(f"{what} not ready in time; last log lines:\n{tails}")


def _initialize(java: str, cp: str, deadline: float) -> None:
    """Write the cluster's metadata once (a marker file says it is done)."""
    marker = STATE / "initialized"
    if marker.exists():
        return
    STATE.mkdir(parents=True, exist_ok=True)
    log = STATE / "initialize.log"
    with open(log, "ab") as out:
        proc = subprocess.run(
            metadata_command(java, cp),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=max(10.0, deadline - time.monotonic()),
            check=False,
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        raise ClusterError(f"initializing the cluster's metadata failed:\n{tail}")
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")


def start(
    timeout: float = 300.0, quiet: bool = False, quorum: tuple[int, int, int] | None = None
) -> Cluster:
    """Start every node not already running, in order, and wait until the brokers are ready.

    ``quorum``: ensemble, write and ack quorum of new ledgers instead of broker.conf's (3, 2, 2),
    kept for this cluster's later starts and restarts until another is given.
    """
    deadline = time.monotonic() + timeout

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    if quorum is not None:
        write_overrides(quorum_keys(*quorum))
    started = False
    java = cp = ""
    for n in NODES:
        if pid(n) is None and _port_open(n.port):
            raise ClusterError(f"port {HOST}:{n.port} ({n.name}) is taken by another program")

    def launch(group: list[Node]) -> None:
        nonlocal java, cp, started
        todo = [n for n in group if pid(n) is None]
        if not todo:
            return
        if not java:
            java, cp = standalone.find_java(), standalone.classpath()
        for n in todo:
            _launch(n, java, cp)
        started = True
        say(f"local/pulsar cluster: started {', '.join(n.name for n in todo)}")

    t0 = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    standalone.warn_if_disk_full(STATE)  # the three bookies write to this disk
    launch([ZOOKEEPER])
    _wait("ZooKeeper", zookeeper_ok, [ZOOKEEPER], deadline)
    if not (STATE / "initialized").exists():
        if not java:
            java, cp = standalone.find_java(), standalone.classpath()
        say("local/pulsar cluster: initializing the cluster's metadata")
        _initialize(java, cp, deadline)
    launch(list(BOOKIE_NODES))
    _wait(
        "the bookies", lambda: all(node_up(b) for b in BOOKIE_NODES), list(BOOKIE_NODES), deadline
    )
    launch(list(BROKER_NODES))
    _wait(
        "the brokers",
        lambda: all(broker_ready(u) for u in ADMIN_URLS),
        list(BROKER_NODES),
        deadline,
    )
    say(f"local/pulsar cluster: ready after {time.monotonic() - t0:.1f} s")
    return Cluster(SERVICE_URL, ADMIN_URLS[0], ADMIN_URLS, started_here=started)


def signal_node(n: Node, sig: int) -> bool:
    """Send ``sig`` to a node's process group. True if it was running."""
    p = pid(n)
    if p is None:
        return False
    try:
        os.killpg(p, sig)
    except ProcessLookupError:
        return False
    return True


_reap = standalone._reap


def wait_gone(n: Node, timeout: float) -> bool:
    p = pid(n)
    deadline = time.monotonic() + timeout
    while p is not None and time.monotonic() < deadline:
        _reap(p)
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        if p is not None:
            return False
    n.pid_file.unlink(missing_ok=True)
    return True


def kill(name: str) -> None:
    """SIGKILL one node, as a crash would (its data stays; ``restart`` brings it back)."""
    n = node(name)
    if not signal_node(n, signal.SIGKILL):
        raise ClusterError(f"{name} is not running")
    if not wait_gone(n, 20):
        raise ClusterError(f"{name} survived SIGKILL for 20 s")


def restart(name: str, timeout: float = 180.0) -> float:
    """Start one stopped node again and wait until it serves; the seconds it took."""
    n = node(name)
    if pid(n) is not None:
        raise ClusterError(f"{name} is running")
    t0 = time.monotonic()
    _launch(n, standalone.find_java(), standalone.classpath())
    _wait(name, lambda: node_up(n), [n], t0 + timeout)
    return time.monotonic() - t0


def stop(timeout: float = 40.0) -> list[str]:
    """Stop every node, brokers first (SIGTERM, then SIGKILL). The names that were running."""
    stopped: list[str] = []
    for group in (BROKER_NODES, BOOKIE_NODES, (ZOOKEEPER,)):
        running = [n for n in group if signal_node(n, signal.SIGTERM)]
        for n in running:
            if not wait_gone(n, timeout):
                signal_node(n, signal.SIGKILL)
                wait_gone(n, 10)
            stopped.append(n.name)
    return stopped


def reset() -> None:
    """Delete the cluster's data (it must be stopped): the next start is a new cluster."""
    if any(pid(n) is not None for n in NODES):
        raise ClusterError("stop the cluster first")
    shutil.rmtree(STATE, ignore_errors=True)


def status() -> tuple[bool, list[str]]:
    lines = []
    for n in NODES:
        p = pid(n)
        state = "serving" if p and node_up(n) else ("starting" if p else "stopped")
        where = f"{HOST}:{n.port}" + (f" (admin {n.admin_port})" if n.admin_port else "")
        lines.append(f"{n.name:10} {state:9} {where}" + (f" pid {p}" if p else ""))
    ready = all(broker_ready(u) for u in ADMIN_URLS)
    lines.append(f"cluster {CLUSTER}: " + (f"ready, {SERVICE_URL}" if ready else "not ready"))
    return ready, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="local/pulsar cluster",
        description=(
            f"A real Apache Pulsar {standalone.PULSAR_VERSION} cluster on this machine: "
            f"1 ZooKeeper, {BOOKIES} bookies, {BROKERS} brokers."
        ),
    )
    parser.add_argument(
        "command", choices=["start", "stop", "status", "kill", "restart", "logs", "reset"]
    )
    parser.add_argument("node", nargs="?", help="for kill, restart and logs: e.g. broker-0")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for ready")
    parser.add_argument(
        "--quorum",
        metavar="E,W,A",
        help="start: ensemble, write quorum, ack quorum of new ledgers (default 3,2,2; kept)",
    )
    args = parser.parse_args(argv)
    quorum: tuple[int, int, int] | None = None
    if args.quorum:
        try:
            e, w, a = (int(x) for x in args.quorum.split(","))
        except ValueError:
            parser.error("--quorum takes three numbers: E,W,A")
        quorum = (e, w, a)
    if args.command in ("kill", "restart", "logs") and not args.node:
        parser.error(f"{args.command} needs a node: {', '.join(n.name for n in NODES)}")
    try:
        if args.command == "start":
            c = start(args.timeout, quorum=quorum)
            print(f"Apache Pulsar cluster {CLUSTER} ready: {c.service_url} (admin {c.admin_url})")
        elif args.command == "stop":
            names = stop()
            print(f"stopped {', '.join(names)}" if names else "not running")
        elif args.command == "status":
            ok, lines = status()
            print("\n".join(lines))
            return 0 if ok else 3
        elif args.command == "kill":
            kill(args.node)
            print(f"killed {args.node} (SIGKILL)")
        elif args.command == "restart":
            print(f"{args.node} serving after {restart(args.node, args.timeout):.1f} s")
        elif args.command == "logs":
            print(log_tail(node(args.node), 200))
        else:
            reset()
            print(f"deleted {STATE}")
    except standalone.PulsarError as exc:
        print(f"local/pulsar cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
