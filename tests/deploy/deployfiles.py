"""Reading the deployment files the way Docker, docker-compose and Kubernetes do, and checking
them against the code, so that a renamed setting, port or command fails a test, not a deploy.

The checks compute what each container would really run with: the service's settings from its
YAML file, the image's ENV, the deployment's env and the command's flags, through the services'
own loader (``carom_runtime.config.load``). An env variable that names no setting, a port that is
not the configured one, or a command that does not exist is reported as a problem (a string).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from carom_recorder.config import RecorderSettings
from carom_router.config import RouterSettings
from carom_runtime import config
from carom_simulator.config import SimulatorSettings, access_refusal
from carom_tracker.config import TrackerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "k8s"
#: Every kustomization a user can apply (tests/deploy renders and validates each).
KUSTOMIZATIONS = (
    "base",
    "overlays/minikube",
    "overlays/minikube-tls",
    "overlays/minikube-cluster",  # with components/pulsar-cluster
)
#: Kubernetes versions whose schemas the rendered manifests must pass (minikube's recent ones).
KUBERNETES_VERSIONS = ("1.32.0", "1.34.0")
#: Values the downward API would give, to expand ``$(VAR)`` references as the kubelet does.
DOWNWARD_API = {"status.hostIP": "192.0.2.10", "status.podIP": "10.244.0.7"}
#: Pulsar's standalone.conf keys that differ in a container, and the values they must have there.
PULSAR_CONTAINER_KEYS = {"bindAddress": "0.0.0.0", "advertisedAddress": "pulsar"}
PULSAR_COMMAND = "bin/pulsar standalone --no-functions-worker --no-stream-storage"
PULSAR_APPLY_ENV = "bin/apply-config-from-env.py conf/standalone.conf"
PULSAR_READY = ("/admin/v2/namespaces/public", "public/default")
#: components/pulsar-cluster: each StatefulSet's role in local/pulsar cluster (carom_local.cluster)
#: and what its container runs, in order: the env config applied to the role's file, then the node.
CLUSTER_ROLES = {
    "zookeeper": (
        "bin/apply-config-from-env.py conf/zookeeper.conf",
        "bin/generate-zookeeper-config.sh conf/zookeeper.conf",
        "exec bin/pulsar zookeeper",
    ),
    "bookie": ("bin/apply-config-from-env.py conf/bookkeeper.conf", "exec bin/pulsar bookie"),
    "broker": ("bin/apply-config-from-env.py conf/broker.conf", "exec bin/pulsar broker"),
}
#: The file of local/pulsar-dist/cluster/ each role's ConfigMap holds, key for key.
CLUSTER_CONF = {"zookeeper": "zookeeper.conf", "bookie": "bookkeeper.conf", "broker": "broker.conf"}
#: Replicas: a ZooKeeper quorum that survives one server, and local/pulsar cluster's counts.
CLUSTER_REPLICAS = {"zookeeper": 3, "bookie": 3, "broker": 2}
#: Every ZooKeeper server by its pod's DNS name, the metadata store of bookies and brokers.
CLUSTER_ZOOKEEPER = ",".join(f"zookeeper-{i}.zookeeper:2181" for i in range(3))
#: The keys of local/pulsar-dist/cluster/*.conf (and of carom_local.cluster.node_keys) that take
#: another value in a pod: addresses, standard ports, folders on the volumes, the ZooKeeper quorum.
#: ``{pod}`` is the pod's name. Every other key must be in the pod with the file's value.
CLUSTER_CONTAINER_KEYS = {
    "zookeeper": {
        "dataDir": "/pulsar/data/zookeeper",
        "clientPort": "2181",
        "clientPortAddress": "0.0.0.0",
    },
    "bookie": {
        # The bookie id is the pod's stable DNS name, not an address.
        "advertisedAddress": "",
        "listeningInterface": "default",
        "allowLoopback": "false",
        "useHostNameAsBookieID": "true",
        "bookiePort": "3181",
        "journalDirectories": "/pulsar/data/bookkeeper/journal",
        "ledgerDirectories": "/pulsar/data/bookkeeper/ledgers",
        "metadataServiceUri": "zk+null://" + CLUSTER_ZOOKEEPER.replace(",", ";") + "/ledgers",
    },
    "broker": {
        "bindAddress": "0.0.0.0",
        "advertisedAddress": "{pod}.broker",
        "brokerServicePort": "6650",
        "webServicePort": "8080",
        "metadataStoreUrl": f"zk:{CLUSTER_ZOOKEEPER}",
        "configurationMetadataStoreUrl": f"zk:{CLUSTER_ZOOKEEPER}",
    },
}
#: What the user gives compose as the simulator's token (its `.env`); a stand-in for the checks.
COMPOSE_TOKEN_VAR = "CAROM_SIMULATOR_TOKEN"
COMPOSE_TOKEN = "compose-checks-token-0123456789"
#: The typed channels' routes: the router routes by it, the recorder subscribes to its topics.
ROUTES_FILE = ROOT / "router" / "routes.yaml"
#: Services meant to run as several replicas (Key_Shared): compose's ``--scale``, a Deployment's
#: replicas. service -> the setting (a folder) where they write, which must be a mounted volume.
SCALABLE = {"tracker": "metrics_dir", "recorder": "out_dir"}


@dataclass(frozen=True)
class Service:
    """A Carom service as the code defines it."""

    name: str
    model: type[msgspec.Struct]
    yaml: Path
    dockerfile: Path
    script: str
    module: str

    @property
    def image(self) -> str:
        return f"carom-{self.name}"


SERVICES = {
    s.name: s
    for s in (
        Service(
            "simulator",
            SimulatorSettings,
            ROOT / "simulator" / "simulator.yaml",
            ROOT / "simulator" / "Dockerfile",
            "carom-simulator",
            "carom_simulator",
        ),
        Service(
            "router",
            RouterSettings,
            ROOT / "router" / "router.yaml",
            ROOT / "router" / "Dockerfile",
            "carom-router",
            "carom_router",
        ),
        Service(
            "tracker",
            TrackerSettings,
            ROOT / "tracker-service" / "tracker.yaml",
            ROOT / "tracker-service" / "Dockerfile",
            "carom-tracker",
            "carom_tracker",
        ),
        Service(
            "recorder",
            RecorderSettings,
            ROOT / "recorder" / "recorder.yaml",
            ROOT / "recorder" / "Dockerfile",
            "carom-recorder",
            "carom_recorder",
        ),
    )
}


def service_of_image(image: str) -> Service | None:
    """The Carom service an image reference (``carom-router:dev``) belongs to, if any."""
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    return next((s for s in SERVICES.values() if s.image == name), None)


def pulsar_version() -> str:
    """The Pulsar version pinned in local/pulsar-dist/pom.xml (the one source of it)."""
    pom = (ROOT / "local" / "pulsar-dist" / "pom.xml").read_text()
    m = re.search(r"<pulsar\.version>([^<]+)</pulsar\.version>", pom)
    assert m, "local/pulsar-dist/pom.xml has no <pulsar.version>"
    return m.group(1)


def standalone_conf() -> dict[str, str]:
    """local/pulsar-dist/standalone.conf as key -> value."""
    out: dict[str, str] = {}
    for line in (ROOT / "local" / "pulsar-dist" / "standalone.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def cluster_conf(role: str) -> dict[str, str]:
    """local/pulsar-dist/cluster/<the role's file> as key -> value."""
    path = ROOT / "local" / "pulsar-dist" / "cluster" / CLUSTER_CONF[role]
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def expected_cluster_env(role: str, pod: str) -> dict[str, str]:
    """The PULSAR_PREFIX_* variables pod ``pod`` of a cluster role must have."""
    keys = {k: v.format(pod=pod) for k, v in CLUSTER_CONTAINER_KEYS[role].items()}
    return {f"PULSAR_PREFIX_{k}": v for k, v in (cluster_conf(role) | keys).items()}


def expected_pulsar_prefix_env() -> dict[str, str]:
    """The PULSAR_PREFIX_* variables a Pulsar container must have: standalone.conf, key for key."""
    conf = standalone_conf() | PULSAR_CONTAINER_KEYS
    return {f"PULSAR_PREFIX_{k}": v for k, v in conf.items()}


# --- tools ---------------------------------------------------------------------------------------


def need_tool(*names: str) -> str:
    """The first of ``names`` on PATH or in .venv/bin; fails (never skips) when none is there."""
    for name in names:
        for found in (shutil.which(name), ROOT / ".venv" / "bin" / name):
            if found and os.access(found, os.X_OK):
                return str(found)
    pytest.fail(f"none of {', '.join(names)} is installed: run local/bootstrap")


def run(cmd: Sequence[str], cwd: Path = ROOT) -> str:
    """stdout of ``cmd``; a failure shows its stderr."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def compose_config(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as docker-compose resolves it (`docker-compose config`)."""
    exe = need_tool("docker-compose")
    env_free = ["env", "-u", "CAROM_UID", "-u", "CAROM_GID", "-u", "CAROM_HOST_ADDRESS",
                f"{COMPOSE_TOKEN_VAR}={COMPOSE_TOKEN}"]  # fmt: skip
    out = run([*env_free, exe, "--project-directory", str(path.parent), "-f", str(path), "config"])
    loaded: dict[str, Any] = yaml.safe_load(out)
    return loaded


def kustomize(path: str) -> list[dict[str, Any]]:
    """The manifests a kustomization renders to (kubectl's kustomize, or kustomize itself)."""
    target = str(K8S / path)
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = run([kubectl, "kustomize", target])
    else:
        out = run([need_tool("kustomize"), "build", target])
    return [d for d in yaml.safe_load_all(out) if d]


# --- Dockerfiles ---------------------------------------------------------------------------------


@dataclass
class Stage:
    """One build stage of a Dockerfile: what the final image gets from it."""

    base: str
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    #: container path -> repository path, for COPY from the build context
    files: dict[str, Path] = field(default_factory=dict)
    copy_sources: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    exposed: set[str] = field(default_factory=set)
    healthcheck: list[str] = field(default_factory=list)


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    line = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not line and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            line += stripped[:-1] + " "
            continue
        line += stripped
        keyword, _, args = line.partition(" ")
        yield keyword.upper(), args.strip()
        line = ""


def _exec_form(args: str) -> list[str]:
    if args.startswith("["):
        form: list[str] = msgspec.json.decode(args.encode(), type=list[str])
        return form
    return ["/bin/sh", "-c", args]


def _substitute(text: str, args: Mapping[str, str]) -> str:
    """``${X}`` and ``${X:-default}`` as the builder expands them, with the ARGs' defaults."""

    def value(m: re.Match[str]) -> str:
        return args.get(m.group(1), "") or (m.group(2) or "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", value, text)


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, enough to know what its final image holds and runs."""
    stages: list[Stage] = []
    args: dict[str, str] = {}  # global ARGs: FROM lines see these
    stage_args: dict[str, str] = {}  # the current stage's ARGs, at their defaults
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "ARG":
            k, _, v = rest.partition("=")
            (stage_args if stages else args)[k] = v
        elif keyword == "FROM":
            parts = rest.split()
            base = _substitute(parts[0], args)
            stage_args = {}
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base=base, name=name))
        elif keyword == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                stages[-1].env[k] = v
        elif keyword == "COPY":
            parts = shlex.split(rest)
            if any(p.startswith("--from") for p in parts):
                continue
            *sources, dest = [_substitute(p, stage_args) for p in parts if not p.startswith("--")]
            stages[-1].copy_sources.extend(sources)
            for src in sources:
                target = dest if not dest.endswith("/") else dest + Path(src).name
                stages[-1].files[target] = ROOT / src
        elif keyword == "ENTRYPOINT":
            stages[-1].entrypoint = _exec_form(rest)
        elif keyword == "CMD":
            stages[-1].cmd = _exec_form(rest)
        elif keyword == "USER":
            stages[-1].user = rest
        elif keyword == "EXPOSE":
            stages[-1].exposed |= {p if "/" in p else f"{p}/tcp" for p in rest.split()}
        elif keyword == "HEALTHCHECK":
            stages[-1].healthcheck = _exec_form(rest.split(" CMD ", 1)[-1].strip())
    return stages


def image_of(service: Service) -> Stage:
    """The final stage of the service's Dockerfile."""
    return parse_dockerfile(service.dockerfile)[-1]


# --- settings a container runs with --------------------------------------------------------------


class Drift(Exception):
    """A deployment file disagrees with the code."""


@dataclass(frozen=True)
class Container:
    """What a deployment runs in one container of a Carom service image."""

    where: str
    service: Service
    argv: list[str]
    #: the image's ENV overlaid with the deployment's
    env: dict[str, str]
    #: container path -> file content, for the files the deployment or image provides
    files: dict[str, str]


def _flags(argv: Sequence[str]) -> list[str]:
    """The arguments after ``carom-x`` or ``python -m carom_x``."""
    python_m = len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-m"
    return list(argv[3:] if python_m else argv[1:])


def command_problems(where: str, service: Service, argv: Sequence[str]) -> list[str]:
    """Whether ``argv`` starts the service with a command and flags that exist."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    if not argv:
        return [f"{where}: no command"]
    if argv[0] in scripts:
        target = scripts[argv[0]]
        module, _, func = target.partition(":")
        if argv[0] != service.script or not module.startswith(service.module):
            return [f"{where}: {argv[0]} is not {service.name}'s command"]
        if not hasattr(import_module(module), func):
            return [f"{where}: {argv[0]} points at {target}, which does not exist"]
    elif len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-m":
        if argv[2] != service.module or find_spec(f"{argv[2]}.__main__") is None:
            return [f"{where}: python -m {argv[2]} does not run {service.name}"]
    else:
        return [f"{where}: {argv[0]!r} is not a console script of pyproject.toml"]
    try:
        _parser(service).parse_args(_flags(argv))
    except (SystemExit, argparse.ArgumentError):
        return [f"{where}: {service.script} does not take the arguments {_flags(argv)}"]
    return []


def _parser(service: Service) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=service.script, exit_on_error=False, add_help=False)
    config.add_flags(parser, service.model)

    def refuse(message: str) -> Any:
        raise SystemExit(message)

    parser.error = refuse  # type: ignore[method-assign]
    return parser


def settings_of(c: Container) -> Any:
    """The settings the container's service would start with; Drift if it would not start."""
    try:
        args = _parser(c.service).parse_args(_flags(c.argv))
    except (SystemExit, argparse.ArgumentError) as exc:
        raise Drift(f"{c.where}: bad arguments {_flags(c.argv)}: {exc}") from None
    path = args.config or c.env.get(f"CAROM_{c.service.name.upper()}_CONFIG")
    with tempfile.TemporaryDirectory() as tmp:
        local: str | None = None
        if path:
            if path not in c.files:
                raise Drift(f"{c.where}: config file {path} is not in the container")
            local = os.path.join(tmp, Path(path).name)
            Path(local).write_text(c.files[path])
        try:
            return config.load(c.service.model, c.service.name, local, env=c.env, args=args)
        except config.ConfigError as exc:
            raise Drift(f"{c.where}: {exc}") from None


def image_files(stage: Stage) -> dict[str, str]:
    return {dest: src.read_text() for dest, src in stage.files.items() if src.is_file()}


def routes_file_of(c: Container, s: Any) -> str | None:
    """The routes file the container's service reads (router, recorder), else None."""
    if c.service.name == "router":
        return str(s.channels.routes_file)
    if c.service.name == "recorder":
        return str(s.routes_file)
    return None


def routes_problems(containers: Sequence[tuple[Container, Any]]) -> list[str]:
    """The router and the recorder read router/routes.yaml, byte for byte, from a path in their
    container (a relative one would be looked for beside the installed package, where it is not):
    so the recorder subscribes to exactly the topics the router publishes on."""
    problems = []
    for c, s in containers:
        path = routes_file_of(c, s)
        if path is None:
            continue
        if not path.startswith("/"):
            problems.append(f"{c.where}: routes file {path} is relative (not in the container)")
        elif path not in c.files:
            problems.append(f"{c.where}: routes file {path} is not in the container")
        elif c.files[path] != ROUTES_FILE.read_text():
            problems.append(f"{c.where}: {path} differs from {ROUTES_FILE.relative_to(ROOT)}")
    return problems


# --- docker-compose ------------------------------------------------------------------------------


def _port(spec: str) -> tuple[str, int, int, str]:
    """``[ip:]host[-last]:container[/proto]`` as (ip, host, container, proto)."""
    spec, _, proto = spec.partition("/")
    parts = spec.split(":")
    ip = parts[0] if len(parts) == 3 else ""
    # A host range (8002-8005:8002, one host port per replica under --scale): its first port.
    return ip, int(parts[-2].split("-")[0]), int(parts[-1]), proto or "tcp"


def compose_containers(compose: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], Container]]:
    """Every compose service built from a Carom image, with what it runs."""
    out = []
    for name, svc in compose["services"].items():
        service = service_of_image(str(svc.get("image", "")))
        if service is None:
            continue
        stage = image_of(service)
        command = svc.get("command")
        argv = shlex.split(command) if isinstance(command, str) else command or stage.cmd
        env = stage.env | {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        where = f"docker-compose.yml services.{name}"
        out.append((name, svc, Container(where, service, list(argv), env, image_files(stage))))
    return out


def compose_problems(compose: Mapping[str, Any]) -> list[str]:
    """Everything in the resolved compose file that disagrees with the code."""
    problems: list[str] = []
    services = compose["services"]
    running: dict[str, tuple[str, Mapping[str, Any], Container, Any]] = {}
    seen = set()
    for name, spec, c in compose_containers(compose):
        seen.add(c.service.name)
        problems += command_problems(c.where, c.service, c.argv)
        try:
            running[c.service.name] = (name, spec, c, settings_of(c))
        except Drift as exc:
            problems.append(str(exc))
    problems += [f"docker-compose.yml: no {n} service" for n in sorted(set(SERVICES) - seen)]
    problems += token_problems("docker-compose.yml", {n: r[3] for n, r in running.items()})
    problems += routes_problems([(r[2], r[3]) for r in running.values()])
    for _, svc, c, s in running.values():
        dockerfile = str(c.service.dockerfile.relative_to(ROOT))
        if svc.get("build", {}).get("dockerfile") != dockerfile:
            problems.append(f"{c.where}: not built from {dockerfile}")
        wanted = {(s.http.port, "tcp")}
        if c.service.name == "router":
            wanted.add((s.webtransport.port, "udp"))
            if s.https.port:
                wanted.add((s.https.port, "tcp"))
        published = set()
        for spec in svc.get("ports", []):
            _, host, inner, proto = _port(str(spec))
            published.add((inner, proto))
            if (inner, proto) not in wanted:
                problems.append(f"{c.where}: port {spec} is not a port the service listens on")
            if host != inner:
                problems.append(f"{c.where}: port {spec} is published under another number")
        if c.service.name == "router" and published != wanted:
            problems.append(f"{c.where}: publishes {sorted(published)}, needs {sorted(wanted)}")
        problems += _compose_links(svc, c, s, services, running)
    pulsar = services.get("pulsar", {})
    problems += pulsar_problems(
        "docker-compose.yml services.pulsar",
        pulsar.get("image", ""),
        _compose_argv(pulsar),
        {k: str(v) for k, v in (pulsar.get("environment") or {}).items()},
        " ".join(pulsar.get("healthcheck", {}).get("test", [])),
    )
    return problems


def _compose_argv(svc: Mapping[str, Any]) -> list[str]:
    command = svc.get("command") or []
    return shlex.split(command) if isinstance(command, str) else list(command)


def _compose_links(
    svc: Mapping[str, Any],
    c: Container,
    s: Any,
    services: Mapping[str, Any],
    running: Mapping[str, tuple[str, Mapping[str, Any], Container, Any]],
) -> list[str]:
    """Whether the URLs the service is configured with lead where they should in compose."""
    problems = []
    host_net = svc.get("network_mode") == "host"
    hosts = dict(str(h).split(":", 1) for h in svc.get("extra_hosts", []))
    broker = urlsplit(s.pulsar.url)
    pulsar_ports = {_port(str(p))[1:3] for p in services.get("pulsar", {}).get("ports", [])}
    if broker.hostname != "pulsar" or broker.port != 6650:
        problems.append(f"{c.where}: pulsar.url {s.pulsar.url} is not the pulsar service")
    if host_net and (hosts.get("pulsar") != "127.0.0.1" or (6650, 6650) not in pulsar_ports):
        problems.append(f"{c.where}: on the host network, `pulsar` must map to 127.0.0.1:6650")
    if c.service.name == "simulator" and not host_net:
        problems.append(f"{c.where}: WebRTC media needs network_mode: host (aiortc#487)")
    if c.service.name == "router" and "simulator" in running:
        sim_name, sim_svc, _, sim_s = running["simulator"]
        url = urlsplit(s.simulator.url)
        if sim_svc.get("network_mode") == "host":
            ok = hosts.get(url.hostname or "") == "host-gateway"
        else:
            ok = url.hostname == sim_name
        if not ok or url.port != sim_s.http.port:
            problems.append(f"{c.where}: simulator.url {s.simulator.url} does not reach {sim_name}")
    if c.service.name in SCALABLE:
        setting = SCALABLE[c.service.name]
        mounts = [str(v).split(":")[1] for v in svc.get("volumes", [])]
        if getattr(s, setting) not in mounts:
            problems.append(f"{c.where}: {setting} {getattr(s, setting)} is not a mounted volume")
        # `--scale <service>=N`: every replica needs a name and host ports of its own.
        if "container_name" in svc:
            problems.append(f"{c.where}: container_name stops `--scale {c.service.name}=2`")
        for spec in svc.get("ports", []):
            host = str(spec).partition("/")[0].split(":")[-2]
            if "-" not in host:
                problems.append(f"{c.where}: port {spec} (one host port) stops --scale")
    for dep in ("pulsar", "simulator") if c.service.name == "router" else ("pulsar",):
        cond = (svc.get("depends_on") or {}).get(dep, {}).get("condition")
        if cond != "service_healthy":
            problems.append(f"{c.where}: must depend on {dep} being healthy")
    return problems


def pulsar_problems(
    where: str, image: str, argv: Sequence[str], env: Mapping[str, str], ready_check: str
) -> list[str]:
    """Whether a Pulsar container runs the pinned standalone broker with Carom's settings."""
    problems = []
    if image != f"apachepulsar/pulsar:{pulsar_version()}":
        problems.append(f"{where}: image {image} is not apachepulsar/pulsar:{pulsar_version()}")
    script = " ".join(" ".join(argv).split())
    if PULSAR_APPLY_ENV not in script or PULSAR_COMMAND not in script:
        problems.append(f"{where}: does not run `{PULSAR_APPLY_ENV} && {PULSAR_COMMAND}`")
    if script.find(PULSAR_APPLY_ENV) > script.find(PULSAR_COMMAND):
        problems.append(f"{where}: applies the env config after starting the broker")
    given = {k: v for k, v in env.items() if k.startswith("PULSAR_PREFIX_")}
    wanted = expected_pulsar_prefix_env()
    for k in sorted(set(wanted) | set(given)):
        if given.get(k) != wanted.get(k):
            problems.append(f"{where}: {k}={given.get(k)} (standalone.conf: {wanted.get(k)})")
    if "-Xmx" not in env.get("PULSAR_MEM", ""):
        problems.append(f"{where}: PULSAR_MEM must bound the heap")
    if not all(part in ready_check for part in PULSAR_READY):
        problems.append(f"{where}: ready check must see public/default in {PULSAR_READY[0]}")
    return problems


# --- Kubernetes ----------------------------------------------------------------------------------


def _expand(value: str, defined: Mapping[str, str]) -> str:
    """``$(VAR)`` as the kubelet expands it: earlier variables only, ``$$`` escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return defined.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def _by_kind(docs: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Mapping[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pod_env(
    container: Mapping[str, Any], pod: Mapping[str, Any], docs: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom, then env in order)."""
    configmaps = _by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        env.update(configmaps.get(ref, {}).get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
        elif "fieldRef" in item.get("valueFrom", {}):
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = DOWNWARD_API.get(path, pod.get("metadata", {}).get("name", "x"))
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_stand_in(ref["name"], ref["key"])
    return env


def secret_stand_in(name: str, key: str) -> str:
    """What a Secret's key stands for in the checks: equal for the same key, unequal otherwise."""
    return f"k8s-secret.{name}.{key}"


def token_problems(where: str, settings: Mapping[str, Any]) -> list[str]:
    """Whether the simulator would start, and the router sends the token it asks for.

    ``settings``: service name -> its settings, as the deployment runs it.
    """
    problems = []
    sim, router = settings.get("simulator"), settings.get("router")
    if sim is not None and (refusal := access_refusal(sim.access)) is not None:
        problems.append(f"{where}: the simulator would not start: {refusal}")
    if sim is not None and router is not None and router.simulator.token != sim.access.token:
        problems.append(f"{where}: router simulator.token is not the simulator's access.token")
    return problems


def mounted_files(
    container: Mapping[str, Any], pod_spec: Mapping[str, Any], docs: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """(ConfigMap files by container path, Secret keys by mount path) the container sees."""
    configmaps = _by_kind(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    files: dict[str, str] = {}
    secrets: dict[str, set[str]] = {}
    for m in container.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        # A configMap volume, or a projected one of several (sources side by side in one folder).
        sources = [vol] if "configMap" in vol else vol.get("projected", {}).get("sources", [])
        for src in sources:
            if "configMap" in src:
                data = configmaps.get(src["configMap"]["name"], {}).get("data", {})
                files |= {f"{m['mountPath']}/{k}": v for k, v in data.items()}
        if "secret" in vol:
            secrets[m["mountPath"]] = {"tls.crt", "tls.key"}
    return files, secrets


@dataclass(frozen=True)
class Workload:
    """A Deployment or StatefulSet and its pod template."""

    kind: str
    name: str
    doc: Mapping[str, Any]

    @property
    def pod(self) -> Mapping[str, Any]:
        template: Mapping[str, Any] = self.doc["spec"]["template"]
        return template

    @property
    def spec(self) -> Mapping[str, Any]:
        spec: Mapping[str, Any] = self.pod["spec"]
        return spec


def workloads(docs: Sequence[Mapping[str, Any]]) -> list[Workload]:
    return [
        Workload(d["kind"], d["metadata"]["name"], d)
        for d in docs
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")
    ]


def _container_port(container: Mapping[str, Any], ref: Any) -> tuple[int, str] | None:
    for p in container.get("ports", []):
        if ref in (p.get("name"), p["containerPort"]):
            return p["containerPort"], p.get("protocol", "TCP")
    return None


def _selects(service: Mapping[str, Any], w: Workload) -> bool:
    selector = service["spec"].get("selector") or {}
    labels = w.pod.get("metadata", {}).get("labels", {})
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def k8s_containers(docs: Sequence[Mapping[str, Any]]) -> list[tuple[Workload, Container, Any]]:
    """Every container of a Carom image, with what it runs, and its raw manifest."""
    out = []
    for w in workloads(docs):
        for raw in w.spec.get("containers", []):
            service = service_of_image(str(raw.get("image", "")))
            if service is None:
                continue
            stage = image_of(service)
            # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD.
            command, args = raw.get("command"), raw.get("args")
            if command:
                argv = command + (args or [])
            else:
                argv = stage.entrypoint + (args if args is not None else stage.cmd)
            env = stage.env | pod_env(raw, w.pod, docs)
            files, _ = mounted_files(raw, w.spec, docs)
            # A volume mounted on a folder hides what the image has there.
            hidden = [m["mountPath"].rstrip("/") + "/" for m in raw.get("volumeMounts", [])]
            kept = {k: v for k, v in image_files(stage).items() if not k.startswith(tuple(hidden))}
            where = f"{w.kind}/{w.name} container {raw['name']}"
            out.append((w, Container(where, service, list(argv), env, kept | files), raw))
    return out


def k8s_problems(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Everything in the rendered manifests that disagrees with the code."""
    problems: list[str] = []
    services = [d for d in docs if d.get("kind") == "Service"]
    seen = set()
    ran: dict[str, Any] = {}
    for w, c, raw in k8s_containers(docs):
        seen.add(c.service.name)
        problems += command_problems(c.where, c.service, c.argv)
        try:
            s = ran[c.service.name] = settings_of(c)
        except Drift as exc:
            problems.append(str(exc))
            continue
        problems += routes_problems([(c, s)])
        wanted = {(s.http.port, "TCP")}
        if c.service.name == "router":
            wanted.add((s.webtransport.port, "UDP"))
            if s.https.port:
                wanted.add((s.https.port, "TCP"))
        declared = {(p["containerPort"], p.get("protocol", "TCP")) for p in raw.get("ports", [])}
        if declared != wanted:
            problems.append(f"{c.where}: containerPorts {sorted(declared)} != {sorted(wanted)}")
        for probe in ("readinessProbe", "livenessProbe"):
            get = raw.get(probe, {}).get("httpGet")
            if get is None:
                problems.append(f"{c.where}: no HTTP {probe}")
            elif _container_port(raw, get["port"]) != (s.http.port, "TCP"):
                problems.append(f"{c.where}: {probe} port {get['port']} is not http.port")
        problems += _config_map_problems(c, raw, w, docs)
        problems += _k8s_links(w, c, s, raw, docs, services)
    problems += [f"k8s: no {n} workload" for n in sorted(set(SERVICES) - seen)]
    problems += token_problems("k8s", ran)
    for svc in services:
        for w in workloads(docs):
            if not _selects(svc, w):
                continue
            for p in svc["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                found = [_container_port(x, target) for x in w.spec["containers"]]
                port = next((f for f in found if f), None)
                name = f"Service/{svc['metadata']['name']}"
                if port is None:
                    problems.append(f"{name}: targetPort {target} is no port of {w.name}")
                elif port[1] != p.get("protocol", "TCP"):
                    problems.append(f"{name}: {target} is {port[1]} in {w.name}")
    pulsar = [w for w in workloads(docs) if w.name == "pulsar"]
    in_cluster = [w for w in workloads(docs) if w.name in CLUSTER_ROLES]
    if not pulsar and not in_cluster:
        problems.append("k8s: no pulsar workload")
    if pulsar and in_cluster:
        problems.append("k8s: the standalone `pulsar` beside a cluster (components/pulsar-cluster)")
    if in_cluster:
        problems += cluster_problems(docs, ran)
    for w in pulsar:
        raw = w.spec["containers"][0]
        probe = raw.get("readinessProbe", {}).get("exec", {}).get("command", [])
        problems += pulsar_problems(
            f"{w.kind}/{w.name}",
            raw.get("image", ""),
            (raw.get("command") or []) + (raw.get("args") or []),
            pod_env(raw, w.pod, docs),
            " ".join(probe),
        )
    return problems


def _config_map_problems(
    c: Container, raw: Mapping[str, Any], w: Workload, docs: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The config file must come from a ConfigMap holding the service's YAML, byte for byte."""
    path = c.env.get(f"CAROM_{c.service.name.upper()}_CONFIG", "")
    mounted, _ = mounted_files(raw, w.spec, docs)
    if path not in mounted:
        return [f"{c.where}: config file {path or '(none)'} is not from a ConfigMap"]
    if mounted[path] != c.service.yaml.read_text():
        return [f"{c.where}: {path} differs from {c.service.yaml.relative_to(ROOT)}"]
    return []


def _k8s_links(
    w: Workload,
    c: Container,
    s: Any,
    raw: Mapping[str, Any],
    docs: Sequence[Mapping[str, Any]],
    services: Sequence[Mapping[str, Any]],
) -> list[str]:
    """Whether the URLs and addresses the service is configured with work in the cluster."""
    problems = []
    node_ip = DOWNWARD_API["status.hostIP"]
    host_net = bool(w.spec.get("hostNetwork"))
    if host_net and w.spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        problems.append(f"{c.where}: a hostNetwork pod needs dnsPolicy ClusterFirstWithHostNet")
    for label, url in (("pulsar.url", s.pulsar.url), ("pulsar.admin_url", s.pulsar.admin_url)) + (
        (("simulator.url", s.simulator.url),) if c.service.name == "router" else ()
    ):
        for host, port in url_hosts(url):
            if not reaches(host, port, docs):
                problems.append(f"{c.where}: {label} {url}: {host}:{port} is no Service port")
    if c.service.name == "simulator":
        if not host_net or w.doc["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"{c.where}: WebRTC needs hostNetwork (and Recreate, one per node)")
        if s.ice.host_addresses != [node_ip]:
            problems.append(f"{c.where}: ice.host_addresses {s.ice.host_addresses} != node IP")
    if c.service.name == "router":
        wt = s.webtransport
        exposed = [
            p
            for svc in services
            if svc["spec"].get("type") == "NodePort" and _selects(svc, w)
            for p in svc["spec"]["ports"]
        ]
        udp = [p for p in exposed if p.get("protocol") == "UDP"]
        if not any(p.get("nodePort") == p["port"] == wt.port for p in udp):
            problems.append(f"{c.where}: no UDP NodePort {wt.port} (the port /config hands out)")
        if wt.public_host != node_ip:
            problems.append(f"{c.where}: webtransport.public_host is not the node's IP")
        for p in exposed:
            target = _container_port(raw, p.get("targetPort", p["port"]))
            scheme = "https" if target == (s.https.port, "TCP") and s.https.port else "http"
            page = f"{scheme}://{node_ip}:{p.get('nodePort')}"
            tcp = p.get("protocol", "TCP") == "TCP"
            if tcp and p.get("nodePort") and page not in s.origins():
                problems.append(f"{c.where}: the page at {page} is not an allowed origin")
        _, secrets = mounted_files(raw, w.spec, docs)
        for f in filter(None, (wt.cert_file, wt.key_file)):
            d, name = os.path.split(f)
            if name not in secrets.get(d, set()):
                problems.append(f"{c.where}: {f} is not in a mounted TLS Secret")
    if c.service.name in SCALABLE:
        setting = SCALABLE[c.service.name]
        mounts = [m["mountPath"] for m in raw.get("volumeMounts", [])]
        if getattr(s, setting) not in mounts:
            problems.append(f"{c.where}: {setting} {getattr(s, setting)} is not a mounted volume")
    return problems


def url_hosts(url: str) -> list[tuple[str, int | None]]:
    """(host, port) of each host a URL names; Pulsar's service URL may list several
    (``pulsar://broker-0.broker:6650,broker-1.broker:6650``)."""
    u = urlsplit(url)
    hosts = [urlsplit(f"{u.scheme}://{part}") for part in u.netloc.split(",")]
    return [(h.hostname or "", h.port) for h in hosts]


def reaches(host: str, port: int | None, docs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``host:port`` is a port of a Service (``name``), or of one pod of a StatefulSet
    through its headless Service (``<statefulset>-<ordinal>.<service>``)."""
    services = _by_kind(docs, "Service")
    pod, _, service = host.partition(".")
    svc = services.get(service if service else host)
    if svc is None or port not in [p["port"] for p in svc["spec"]["ports"]]:
        return False
    if not service:
        return True
    if svc["spec"].get("clusterIP") != "None":
        return False  # only a headless Service gives each pod a name
    for w in workloads(docs):
        if w.kind == "StatefulSet" and w.doc["spec"].get("serviceName") == service:
            replicas = w.doc["spec"].get("replicas", 1)
            pods = {f"{w.name}-{i}" for i in range(replicas)}
            return pod in pods and _selects(svc, w)
    return False


def cluster_brokers() -> list[str]:
    """Every broker of components/pulsar-cluster, by its pod's DNS name (its advertised address)."""
    return [f"broker-{i}.broker" for i in range(CLUSTER_REPLICAS["broker"])]


def cluster_problems(docs: Sequence[Mapping[str, Any]], ran: Mapping[str, Any]) -> list[str]:
    """Whether components/pulsar-cluster runs local/pulsar cluster's nodes, with its settings.

    ``ran``: Carom service name -> its settings, as the deployment runs it.
    """
    from carom_local import cluster

    problems: list[str] = []
    image = f"apachepulsar/pulsar:{pulsar_version()}"
    sets = {w.name: w for w in workloads(docs) if w.kind == "StatefulSet"}
    services = _by_kind(docs, "Service")
    for role, steps in CLUSTER_ROLES.items():
        where = f"StatefulSet/{role}"
        w = sets.get(role)
        if w is None:
            problems.append(f"k8s: no StatefulSet {role} (components/pulsar-cluster)")
            continue
        replicas = w.doc["spec"].get("replicas")
        if replicas != CLUSTER_REPLICAS[role]:
            problems.append(f"{where}: {replicas} replicas, not {CLUSTER_REPLICAS[role]}")
        svc = services.get(w.doc["spec"].get("serviceName", ""), {"spec": {}})
        if not (svc["spec"].get("clusterIP") == "None" and _selects(svc, w)
                and svc["spec"].get("publishNotReadyAddresses")):  # fmt: skip
            problems.append(f"{where}: its pods' names need a headless Service of its own that "
                            "publishes them before they are ready")  # fmt: skip
        for raw in [*w.spec.get("initContainers", []), *w.spec["containers"]]:
            if raw.get("image") != image:
                problems.append(f"{where} container {raw['name']}: image is not {image}")
        raw = w.spec["containers"][0]
        script = " ".join(" ".join([*raw.get("command", []), *raw.get("args", [])]).split())
        at = [script.find(step) for step in steps]
        if -1 in at or at != sorted(at):
            problems.append(f"{where}: does not run `{' && '.join(steps)}`")
        pod = f"{role}-0"
        env = pod_env(raw, {"metadata": {"name": pod}}, docs)
        given = {k: v for k, v in env.items() if k.startswith("PULSAR_PREFIX_")}
        wanted = expected_cluster_env(role, pod)
        for k in sorted(set(wanted) | set(given)):
            if given.get(k) != wanted.get(k):
                problems.append(
                    f"{where}: {k}={given.get(k)} (cluster/{CLUSTER_CONF[role]}: {wanted.get(k)})"
                )
        memory = " ".join(cluster.MEMORY[role])
        if env.get("PULSAR_MEM") != memory:
            problems.append(f"{where}: PULSAR_MEM={env.get('PULSAR_MEM')} (local/pulsar: {memory})")
        if "readinessProbe" not in raw or "livenessProbe" not in raw:
            problems.append(f"{where}: needs a readiness and a liveness probe")
        if role == "zookeeper":
            servers = ",".join(f"zookeeper-{i}" for i in range(replicas or 0))
            if env.get("ZOOKEEPER_SERVERS") != servers:
                problems.append(f"{where}: ZOOKEEPER_SERVERS is not {servers}")
    ensemble = int(cluster_conf("broker")["managedLedgerDefaultEnsembleSize"])
    if CLUSTER_REPLICAS["bookie"] < ensemble:
        problems.append(f"k8s: fewer bookies than the ensemble size {ensemble}")
    problems += _metadata_job_problems(docs)
    for name, s in ran.items():
        hosts = [f"{h}:{p}" for h, p in url_hosts(s.pulsar.url)]
        if hosts != [f"{b}:6650" for b in cluster_brokers()]:
            problems.append(f"k8s {name}: pulsar.url {s.pulsar.url} does not list every broker")
    return problems


def _metadata_job_problems(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The Job that writes the cluster's metadata: local/pulsar cluster's command, flag for flag,
    with the pods' addresses, after ZooKeeper answers."""
    from carom_local import cluster

    jobs = [
        d for d in docs if d.get("kind") == "Job" and d["metadata"]["name"] == "cluster-metadata"
    ]
    if not jobs:
        return ["k8s: no Job cluster-metadata (initialize-cluster-metadata)"]
    where = "Job/cluster-metadata"
    pod = jobs[0]["spec"]["template"]
    raw = pod["spec"]["containers"][0]
    problems = []
    if raw.get("image") != f"apachepulsar/pulsar:{pulsar_version()}":
        problems.append(f"{where}: image is not apachepulsar/pulsar:{pulsar_version()}")
    if pod["spec"].get("restartPolicy") != "OnFailure":
        problems.append(f"{where}: restartPolicy must be OnFailure (retried until ZooKeeper is up)")
    env = pod_env(raw, pod, docs)
    script = " ".join([*raw.get("command", []), *raw.get("args", [])])
    script = script.replace("$ZOOKEEPER", env.get("ZOOKEEPER", "$ZOOKEEPER"))
    wait, sep, tail = script.partition("bin/pulsar initialize-cluster-metadata")
    if not sep or "zookeeper-shell" not in wait:
        problems.append(f"{where}: must wait for ZooKeeper, then run initialize-cluster-metadata")
        return problems
    args = shlex.split(tail)
    flags = dict(zip(args[::2], args[1::2], strict=False))
    argv = cluster.metadata_command("java", "classpath")
    main = argv.index("org.apache.pulsar.PulsarClusterMetadataSetup")
    local = [a for a in argv[main + 1 :] if a.startswith("--")]
    if sorted(flags) != sorted(local):
        problems.append(f"{where}: flags {sorted(flags)} are not local/pulsar cluster's {local}")
    brokers = cluster_brokers()
    wanted = {
        "--cluster": cluster_conf("broker")["clusterName"],
        "--metadata-store": f"zk:{CLUSTER_ZOOKEEPER}",
        "--configuration-metadata-store": f"zk:{CLUSTER_ZOOKEEPER}",
        "--web-service-url": "http://" + ",".join(f"{b}:8080" for b in brokers),
        "--broker-service-url": "pulsar://" + ",".join(f"{b}:6650" for b in brokers),
        "--default-namespace-bundle-number": cluster_conf("broker")[
            "defaultNumberOfNamespaceBundles"
        ],
    }
    for flag, value in wanted.items():
        if flags.get(flag) != value:
            problems.append(f"{where}: {flag} {flags.get(flag)} (wanted {value})")
    if wanted["--cluster"] != cluster.CLUSTER:
        problems.append(f"local/pulsar cluster's name {cluster.CLUSTER} is not broker.conf's")
    return problems
