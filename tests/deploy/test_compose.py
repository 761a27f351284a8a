"""docker-compose.yml is valid for docker-compose (checked offline: no Docker engine needed)."""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from carom_local import cluster
from tests.deploy.deployfiles import (
    COMPOSE_FILE,
    COMPOSE_TOKEN,
    COMPOSE_TOKEN_VAR,
    ROOT,
    SERVICES,
    Drift,
    compose_config,
    compose_containers,
    image_of,
    need_tool,
    run,
    settings_of,
)

#: As a user runs it: with the simulator's token in the environment (or in .env).
WITH_TOKEN = ["env", f"{COMPOSE_TOKEN_VAR}={COMPOSE_TOKEN}"]


def test_compose_file_validates() -> None:
    run([*WITH_TOKEN, need_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q"])


def test_no_token_stops_compose_before_anything_starts(tmp_path: Path) -> None:
    """Without CAROM_SIMULATOR_TOKEN, every docker-compose command says what to set."""
    proc = subprocess.run(
        ["env", "-u", COMPOSE_TOKEN_VAR, need_tool("docker-compose"),
         "--project-directory", str(tmp_path), "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"set {COMPOSE_TOKEN_VAR}" in proc.stderr, proc.stderr


def test_validator_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a depends_on condition that does not exist is refused."""
    text = COMPOSE_FILE.read_text()
    broken = text.replace("condition: service_healthy", "condition: service_ready", 1)
    assert broken != text
    (tmp_path / "docker-compose.yml").write_text(broken)
    exe = need_tool("docker-compose")
    proc = subprocess.run(
        [*WITH_TOKEN, exe, "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "service_ready" in proc.stderr


def test_every_service_has_a_healthcheck() -> None:
    """depends_on service_healthy needs one: Pulsar's in compose, the others' in their image."""
    services = compose_config()["services"]
    assert "test" in services["pulsar"]["healthcheck"]
    for service in SERVICES.values():
        assert image_of(service).healthcheck, f"{service.dockerfile} has no HEALTHCHECK"


# --- the cluster profile (docker-compose.cluster.yml) ---------------------------------------------

CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
STANDIN_PULSAR = ROOT / "docker" / "pulsar-standin" / "pulsar"
#: What plain `docker-compose up` runs, today and after the cluster file was added.
DEFAULT_SERVICES = {"pulsar", *SERVICES}
#: The partition count the cluster file gives Carom's three topics.
PARTITIONS = 4
#: docker-compose.cluster.yml's services by role of local/pulsar cluster (carom_local.cluster).
ROLE_FILE = {"zookeeper": "zookeeper.conf", "bookie": "bookkeeper.conf", "broker": "broker.conf"}
APPLY = {role: f"bin/apply-config-from-env.py conf/{f}" for role, f in ROLE_FILE.items()}
#: The keys of local/pulsar-dist/cluster/*.conf and of carom_local.cluster.node_keys that take
#: another value in a container: addresses (all interfaces; the service's name, ``{name}``), the
#: default ports and the image's folders (a container per node), ZooKeeper by its service name.
#: None: any value (the brokers' ports, which must differ: see compose_cluster_problems).
CONTAINER_KEYS: dict[str, dict[str, str | None]] = {
    "zookeeper": {
        "dataDir": "data/zookeeper",
        "clientPort": "2181",
        "clientPortAddress": "0.0.0.0",
    },
    "bookie": {
        "advertisedAddress": "{name}",
        "listeningInterface": "eth0",
        "bookiePort": "3181",
        "journalDirectories": "data/bookkeeper/journal",
        "ledgerDirectories": "data/bookkeeper/ledgers",
        "metadataServiceUri": "zk+null://zookeeper:2181/ledgers",
    },
    "broker": {
        "bindAddress": "0.0.0.0",
        "advertisedAddress": "{name}",
        "brokerServicePort": None,
        "webServicePort": None,
        "metadataStoreUrl": "zk:zookeeper:2181",
        "configurationMetadataStoreUrl": "zk:zookeeper:2181",
    },
}


def cluster_config() -> dict[str, Any]:
    """docker-compose.yml + docker-compose.cluster.yml, profile cluster, resolved by compose."""
    exe = need_tool("docker-compose")
    env_free = ["env", "-u", "CAROM_UID", "-u", "CAROM_GID", "-u", "CAROM_HOST_ADDRESS",
                f"{COMPOSE_TOKEN_VAR}={COMPOSE_TOKEN}"]  # fmt: skip
    files = ["-f", str(COMPOSE_FILE), "-f", str(CLUSTER_FILE)]
    out = run([*env_free, exe, "--project-directory", str(ROOT), *files, "--profile", "cluster",
               "config"])  # fmt: skip
    loaded: dict[str, Any] = yaml.safe_load(out)
    return loaded


@pytest.fixture(scope="module")
def clustered() -> dict[str, Any]:
    return cluster_config()


def _prefixed(svc: Mapping[str, Any]) -> dict[str, str]:
    """A service's PULSAR_PREFIX_<key> variables as key -> value."""
    env = svc.get("environment") or {}
    prefix = "PULSAR_PREFIX_"
    return {k[len(prefix) :]: str(v) for k, v in env.items() if k.startswith(prefix)}


def _hosts(url: str) -> set[tuple[str, int | None]]:
    """(host, port) of every host a URL names (Pulsar's service URL may list several)."""
    u = urlsplit(url)
    return {(h.hostname or "", h.port) for h in (urlsplit(f"x://{p}") for p in u.netloc.split(","))}


def _flags(argv: Sequence[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def _depends(svc: Mapping[str, Any]) -> dict[str, str]:
    return {k: v.get("condition", "") for k, v in (svc.get("depends_on") or {}).items()}


def _standin_commands() -> set[str]:
    """The bin/pulsar commands the stand-in image's script runs (its ``case`` arms)."""
    return set(re.findall(r"^\s+([a-z-]+)\)$", STANDIN_PULSAR.read_text(), re.M))


def compose_cluster_problems(config: Mapping[str, Any]) -> list[str]:
    """Whether the cluster profile runs local/pulsar cluster's nodes with its settings, wired as
    its header says, and the Carom services on it."""
    services = config["services"]
    problems: list[str] = []
    image = services["pulsar"]["image"]
    where = "docker-compose.cluster.yml"
    by_role: dict[str, list[str]] = {}
    for n in cluster.NODES:
        by_role.setdefault(n.role, []).append(n.name)
    nodes = [n for n in cluster.NODES if n.name in services]
    problems += [f"{where}: no {n.name} (a node of local/pulsar cluster)" for n in cluster.NODES
                 if n.name not in services]  # fmt: skip
    if "pulsar-init" not in services:
        return [*problems, f"{where}: no pulsar-init"]
    if services["pulsar"].get("scale") != 0:
        problems.append(f"{where}: the standalone broker still starts (not scale 0)")
    standin = _standin_commands()
    envs = {n.name: _prefixed(services[n.name]) for n in nodes}
    data_volumes: dict[str, str] = {}  # volume -> the node that keeps its data there
    for n in nodes:
        svc, at = services[n.name], f"{where} services.{n.name}"
        conf = cluster.read_conf(cluster.CONF_DIR / ROLE_FILE[n.role])
        keys = CONTAINER_KEYS[n.role]
        if missing := set(cluster.node_keys(n)) - set(keys):
            problems.append(f"{at}: no container value for cluster.py's node keys {missing}")
        for k, v in sorted((conf | {k: v or "" for k, v in keys.items()}).items()):
            want = v.format(name=n.name) if k not in keys or keys[k] is not None else None
            got = envs[n.name].get(k)
            if got is None or (want is not None and got != want):
                problems.append(f"{at}: {k}={got} ({ROLE_FILE[n.role]}: {want})")
        for k in sorted(set(envs[n.name]) - set(conf) - set(keys)):
            problems.append(f"{at}: {k} is in no key of {ROLE_FILE[n.role]}")
        if svc.get("image") != image or "cluster" not in svc.get("profiles", []):
            problems.append(f"{at}: not {image} in the profile cluster")
        argv = svc.get("command") or []
        script = argv[2] if len(argv) == 3 and argv[:2] == ["bash", "-c"] else ""
        # bash: ZooKeeper's keys have dots, and dash drops such variables from the environment.
        if script != f"{APPLY[n.role]} && exec bin/pulsar {n.role}":
            problems.append(f"{at}: command {argv} is not bash -c '{APPLY[n.role]} && exec ...'")
        if n.role not in standin:
            problems.append(f"{at}: the stand-in image's bin/pulsar has no `{n.role}`")
        env = svc.get("environment") or {}
        mem = env.get("BOOKIE_MEM" if n.role == "bookie" else "PULSAR_MEM", "")
        if "-Xmx" not in str(mem) or not svc.get("mem_limit"):
            problems.append(f"{at}: needs a bounded heap and a mem_limit")
        if "test" not in (svc.get("healthcheck") or {}) or svc.get("restart") != "on-failure":
            problems.append(f"{at}: needs a healthcheck and restart: on-failure")
        deps = _depends(svc)
        want_deps = {} if n.role == "zookeeper" else {
            "zookeeper": "service_healthy", "pulsar-init": "service_completed_successfully",
            **({b: "service_healthy" for b in by_role["bookie"]} if n.role == "broker" else {}),
        }  # fmt: skip
        if deps != want_deps:
            problems.append(f"{at}: depends_on {deps}, not {want_deps}")
        if n.role in ("zookeeper", "bookie"):
            volumes = [str(v).split(":") for v in svc.get("volumes", [])]
            named = [v[0] for v in volumes if v[0] in (config.get("volumes") or {})]
            if [v[1] for v in volumes] != ["/pulsar/data"] or not named:
                problems.append(f"{at}: needs a named volume at /pulsar/data")
            elif named[0] in data_volumes:
                problems.append(f"{at}: shares its volume {named[0]} with {data_volumes[named[0]]}")
            else:
                data_volumes[named[0]] = n.name
    # The metadata init: the cluster the brokers join, where they keep it, how they are reached.
    init = services["pulsar-init"]
    argv = init.get("command") or []
    flags = _flags(argv)
    brokers = [b for b in by_role["broker"] if b in envs]
    bookies = [b for b in by_role["bookie"] if b in envs]
    one = envs.get(brokers[0], {}) if brokers else {}
    at = f"{where} services.pulsar-init"
    init_cmd = "initialize-cluster-metadata"
    if argv[:2] != ["bin/pulsar", init_cmd] or init_cmd not in standin:
        problems.append(f"{at}: does not run bin/pulsar {init_cmd} (or the stand-in cannot)")
    if "test" in (init.get("healthcheck") or {}) or init.get("restart"):
        problems.append(f"{at}: a one-shot: no healthcheck, no restart")
    if init.get("image") != image or not init.get("mem_limit"):
        problems.append(f"{at}: not {image}, or no mem_limit")
    if _depends(init) != {"zookeeper": "service_healthy"}:
        problems.append(f"{at}: must wait for ZooKeeper being healthy")
    wanted_flags = {
        "--cluster": one.get("clusterName"),
        "--metadata-store": one.get("metadataStoreUrl"),
        "--configuration-metadata-store": one.get("configurationMetadataStoreUrl"),
        "--default-namespace-bundle-number": one.get("defaultNumberOfNamespaceBundles"),
    }
    for flag, want in wanted_flags.items():
        if flags.get(flag) != want:
            problems.append(f"{at}: {flag} {flags.get(flag)}, the brokers': {want}")
    ports = {b: (int(envs[b]["brokerServicePort"]), int(envs[b]["webServicePort"])) for b in brokers
             if envs[b].get("brokerServicePort") and envs[b].get("webServicePort")}  # fmt: skip
    service_hosts = {(b, p[0]) for b, p in ports.items()}
    web_hosts = {(b, p[1]) for b, p in ports.items()}
    if _hosts(flags.get("--broker-service-url", "")) != service_hosts:
        problems.append(f"{at}: --broker-service-url is not {sorted(service_hosts)}")
    if _hosts(flags.get("--web-service-url", "")) != web_hosts:
        problems.append(f"{at}: --web-service-url is not {sorted(web_hosts)}")
    # Brokers: ports of their own (the host-networked simulator reaches each at 127.0.0.1),
    # published on loopback under the same numbers; all agree; ledgers fit the bookies.
    if len({p for pair in ports.values() for p in pair}) != 2 * len(brokers):
        problems.append(f"{where}: every broker needs ports of its own: {ports}")
    for b, (service_port, web_port) in ports.items():
        published = {str(p) for p in services[b].get("ports", [])}
        for p in (service_port, web_port):
            if f"127.0.0.1:{p}:{p}/tcp" not in published:
                problems.append(f"{where} services.{b}: port {p} is not published on 127.0.0.1:{p}")
    for k in ("clusterName", "managedLedgerDefaultEnsembleSize"):
        if len({envs[b].get(k) for b in brokers}) != 1:
            problems.append(f"{where}: the brokers disagree on {k}")
    ensemble = int(one.get("managedLedgerDefaultEnsembleSize", 0))
    if not 0 < ensemble <= len(bookies):
        problems.append(f"{where}: ensemble {ensemble} with {len(bookies)} bookies")
    # The Carom services: every broker, partitioned topics, started once both brokers serve.
    hosts_ok = {b: "127.0.0.1" for b in brokers}
    for name, svc, c in compose_containers(config):
        at = f"{where} services.{name}"
        try:
            s = settings_of(c)
        except Drift as exc:
            problems.append(str(exc))
            continue
        if _hosts(s.pulsar.url) != service_hosts:
            problems.append(f"{at}: pulsar.url {s.pulsar.url} does not name every broker")
        if len(_hosts(s.pulsar.admin_url) & web_hosts) != 1:
            problems.append(f"{at}: pulsar.admin_url {s.pulsar.admin_url} is no broker's")
        if s.pulsar.partitions != PARTITIONS:
            problems.append(f"{at}: pulsar.partitions {s.pulsar.partitions}, not {PARTITIONS}")
        if any(_depends(svc).get(b) != "service_healthy" for b in brokers):
            problems.append(f"{at}: must depend on every broker being healthy")
        extra = svc.get("extra_hosts") or {}  # a mapping once compose merged two files
        if not isinstance(extra, Mapping):
            extra = dict(str(h).split(":", 1) for h in extra)
        host_net = svc.get("network_mode") == "host"
        if host_net and any(extra.get(b) != ip for b, ip in hosts_ok.items()):
            problems.append(f"{at}: on the host network, every broker's name must map to 127.0.0.1")
    return problems


def test_the_default_stack_is_todays() -> None:
    """Plain docker-compose reads docker-compose.yml only (no docker-compose.override.yml), and
    lists exactly today's services: the cluster file changes nothing until it is named."""
    assert not (ROOT / "docker-compose.override.yml").exists()
    listed = run([*WITH_TOKEN, need_tool("docker-compose"), "--project-directory", str(ROOT),
                  "-f", str(COMPOSE_FILE), "config", "--services"])  # fmt: skip
    assert set(listed.split()) == DEFAULT_SERVICES
    assert "profiles" not in COMPOSE_FILE.read_text()


def test_cluster_profile_validates() -> None:
    files = ["-f", str(COMPOSE_FILE), "-f", str(CLUSTER_FILE)]
    run([*WITH_TOKEN, need_tool("docker-compose"), "--project-directory", str(ROOT), *files,
         "--profile", "cluster", "config", "-q"])  # fmt: skip


def test_cluster_profile_matches_local_pulsar_cluster(clustered: dict[str, Any]) -> None:
    assert compose_cluster_problems(clustered) == []
    assert set(clustered["services"]) == DEFAULT_SERVICES | {n.name for n in cluster.NODES} | {
        "pulsar-init"
    }


def _cluster_with(config: dict[str, Any], change: Callable[[dict[str, Any]], object]) -> list[str]:
    broken = copy.deepcopy(config)
    change(broken["services"])
    return compose_cluster_problems(broken)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s: s["broker-1"]["environment"].pop(
                "PULSAR_PREFIX_metadataStoreSessionTimeoutMillis"
            ),
            "broker-1: metadataStoreSessionTimeoutMillis=None",
        ),
        (
            lambda s: s["bookie-2"]["environment"].update(
                PULSAR_PREFIX_advertisedAddress="bookie-0"
            ),
            "bookie-2: advertisedAddress=bookie-0",
        ),
        (
            lambda s: s["zookeeper"]["environment"].update({"PULSAR_PREFIX_tickTime": "3000"}),
            "zookeeper: tickTime=3000",
        ),
        (
            lambda s: s["broker-0"]["environment"].update(PULSAR_PREFIX_brokerServicePort="6651"),
            "every broker needs ports of its own",
        ),
        (
            lambda s: s["broker-1"].update(ports=["127.0.0.1:6651:6651/tcp"]),
            "broker-1: port 8081 is not published",
        ),
        (lambda s: s["pulsar-init"]["command"].__setitem__(3, "other"), "--cluster other"),
        (
            lambda s: s["tracker"]["depends_on"].pop("broker-1"),
            "tracker: must depend on every broker",
        ),
        (
            lambda s: s["simulator"]["environment"].update(CAROM_SIMULATOR__PULSAR__PARTITIONS="0"),
            "simulator: pulsar.partitions 0",
        ),
        (
            lambda s: s["router"]["environment"].update(
                CAROM_ROUTER__PULSAR__URL="pulsar://broker-0:6650"
            ),
            "router: pulsar.url",
        ),
        (
            lambda s: s["simulator"].update(extra_hosts=["pulsar:127.0.0.1"]),
            "simulator: on the host network",
        ),
        (lambda s: s["broker-0"]["depends_on"].pop("bookie-2"), "broker-0: depends_on"),
        (
            lambda s: s["bookie-1"].update(volumes=["bookie-0-data:/pulsar/data:rw"]),
            "bookie-1: shares its volume bookie-0-data",
        ),
        (lambda s: s["pulsar"].pop("scale"), "the standalone broker still starts"),
        (
            lambda s: s["bookie-0"].update(command=["sh", "-c", s["bookie-0"]["command"][2]]),
            "bookie-0: command",
        ),
    ],
)
def test_cluster_checks_can_fail(
    clustered: dict[str, Any], change: Callable[[dict[str, Any]], object], expected: str | None
) -> None:
    problems = _cluster_with(clustered, change)
    assert problems, "the broken copy passed"
    if expected is not None:
        assert any(expected in p for p in problems), problems
