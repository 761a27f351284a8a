"""No drift between the deployment files and the code: every CAROM_* variable names a setting of
its service, every command and flag exists, every port is the configured one, the config files
are the services' own, and Pulsar is the pinned version with local/pulsar's settings.

Each check is also shown to fail on a broken copy, so a green run means something.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from carom_local.pulsar import PULSAR_VERSION
from tests.deploy.deployfiles import (
    KUSTOMIZATIONS,
    ROOT,
    SERVICES,
    compose_config,
    compose_problems,
    k8s_problems,
    kustomize,
    pulsar_version,
)

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="module")
def tls_docs() -> Docs:
    return kustomize("overlays/minikube-tls")


def test_compose_matches_the_code(compose: dict[str, Any]) -> None:
    assert compose_problems(compose) == []


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_k8s_matches_the_code(path: str) -> None:
    assert k8s_problems(kustomize(path)) == []


def test_pulsar_is_pinned_to_one_version_everywhere(compose: dict[str, Any]) -> None:
    version = pulsar_version()
    assert version == PULSAR_VERSION
    image = f"apachepulsar/pulsar:{version}"
    assert compose["services"]["pulsar"]["image"] == image
    for path in KUSTOMIZATIONS:
        images = {
            c["image"]
            for d in kustomize(path)
            if d["kind"] == "StatefulSet"
            for c in d["spec"]["template"]["spec"]["containers"]
        }
        assert images == {image}, path
    assert image in (ROOT / "README.md").read_text()


def test_compose_and_k8s_run_the_same_images(compose: dict[str, Any], tls_docs: Docs) -> None:
    in_compose = {s["image"] for s in compose["services"].values()}
    in_k8s = {
        c["image"]
        for d in tls_docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert in_compose == in_k8s
    assert {f"{s.image}:dev" for s in SERVICES.values()} <= in_k8s


# --- the checks can fail -------------------------------------------------------------------------


def _compose_with(compose: dict[str, Any], change: Callable[[dict[str, Any]], object]) -> list[str]:
    broken = copy.deepcopy(compose)
    change(broken["services"])
    return compose_problems(broken)


def _container(docs: Docs, name: str) -> dict[str, Any]:
    workload = next(
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name
    )
    container: dict[str, Any] = workload["spec"]["template"]["spec"]["containers"][0]
    return container


def _k8s_with(docs: Docs, change: Callable[[Docs], object]) -> list[str]:
    broken = copy.deepcopy(docs)
    change(broken)
    return k8s_problems(broken)


def test_a_bogus_env_variable_is_caught(compose: dict[str, Any], tls_docs: Docs) -> None:
    bogus = "CAROM_ROUTER__WEBTRANSPORT__PROT"
    problems = _compose_with(compose, lambda s: s["router"]["environment"].update({bogus: "1"}))
    assert any(bogus in p for p in problems), problems
    env = {"name": "CAROM_TRACKER__WINDOW", "value": "2"}
    problems = _k8s_with(tls_docs, lambda d: _container(d, "tracker")["env"].append(env))
    assert any("CAROM_TRACKER__WINDOW" in p for p in problems), problems


def test_a_bad_value_is_caught(compose: dict[str, Any]) -> None:
    problems = _compose_with(
        compose, lambda s: s["tracker"]["environment"].update({"CAROM_TRACKER__WINDOW_S": "-1"})
    )
    assert any("window_s" in p for p in problems), problems


def test_a_moved_port_is_caught(compose: dict[str, Any], tls_docs: Docs) -> None:
    moved = {"CAROM_ROUTER__WEBTRANSPORT__PORT": "4434"}
    problems = _compose_with(compose, lambda s: s["router"]["environment"].update(moved))
    assert any("4433" in p for p in problems), problems
    problems = _k8s_with(
        tls_docs, lambda d: _container(d, "simulator")["ports"][0].update(containerPort=8011)
    )
    assert any("8011" in p for p in problems), problems


def test_a_missing_command_or_flag_is_caught(compose: dict[str, Any], tls_docs: Docs) -> None:
    problems = _compose_with(compose, lambda s: s["router"].update(command="carom-routr"))
    assert any("carom-routr" in p for p in problems), problems
    problems = _k8s_with(
        tls_docs, lambda d: _container(d, "tracker").update(args=["--window", "3"])
    )
    assert any("--window" in p for p in problems), problems
    problems = _k8s_with(
        tls_docs, lambda d: _container(d, "tracker").update(command=["carom-report"])
    )
    assert any("not tracker's command" in p for p in problems), problems
    ok = _compose_with(
        compose, lambda s: s["tracker"].update(command="python -m carom_tracker --window-s 3")
    )
    assert ok == []


def test_a_config_file_that_differs_is_caught(tls_docs: Docs) -> None:
    def edit(docs: Docs) -> None:
        cm = next(d for d in docs if d["metadata"]["name"].startswith("tracker-config"))
        cm["data"]["tracker.yaml"] += "\n# edited\n"

    problems = _k8s_with(tls_docs, edit)
    assert any("differs from tracker-service/tracker.yaml" in p for p in problems), problems


def test_pulsar_drift_is_caught(compose: dict[str, Any], tls_docs: Docs) -> None:
    problems = _compose_with(
        compose, lambda s: s["pulsar"]["environment"].pop("PULSAR_PREFIX_journalSyncData")
    )
    assert any("journalSyncData" in p for p in problems), problems
    problems = _k8s_with(
        tls_docs, lambda d: _container(d, "pulsar").update(image="apachepulsar/pulsar:4.0.8")
    )
    assert any("4.0.8" in p for p in problems), problems


def test_network_choices_are_checked(compose: dict[str, Any], tls_docs: Docs) -> None:
    problems = _compose_with(compose, lambda s: s["simulator"].pop("network_mode"))
    assert any("network_mode: host" in p for p in problems), problems

    def no_host_network(docs: Docs) -> None:
        workload = next(d for d in docs if d["metadata"]["name"] == "simulator" and "spec" in d
                        and "template" in d["spec"])  # fmt: skip
        workload["spec"]["template"]["spec"].pop("hostNetwork")

    problems = _k8s_with(tls_docs, no_host_network)
    assert any("hostNetwork" in p for p in problems), problems


def test_a_missing_tls_secret_mount_is_caught(tls_docs: Docs) -> None:
    def drop_mount(docs: Docs) -> None:
        c = _container(docs, "router")
        c["volumeMounts"] = [m for m in c["volumeMounts"] if "tls" not in m["mountPath"]]

    problems = _k8s_with(tls_docs, drop_mount)
    assert any("tls.crt" in p for p in problems), problems


def test_a_token_mismatch_is_caught(compose: dict[str, Any], tls_docs: Docs) -> None:
    """The simulator's session API answers its token only: the router must send that one."""
    other = {"CAROM_ROUTER__SIMULATOR__TOKEN": "another-token-0123456789"}
    problems = _compose_with(compose, lambda s: s["router"]["environment"].update(other))
    assert any("simulator.token" in p for p in problems), problems
    problems = _compose_with(
        compose, lambda s: s["simulator"]["environment"].pop("CAROM_SIMULATOR__ACCESS__TOKEN")
    )
    assert any("would not start: no access token" in p for p in problems), problems

    def other_key(docs: Docs) -> None:
        env = _container(docs, "router")["env"]
        item = next(e for e in env if e["name"] == "CAROM_ROUTER__SIMULATOR__TOKEN")
        item["valueFrom"]["secretKeyRef"]["key"] = "other"

    problems = _k8s_with(tls_docs, other_key)
    assert any("simulator.token" in p for p in problems), problems

    def no_token(docs: Docs) -> None:
        c = _container(docs, "simulator")
        c["env"] = [e for e in c["env"] if e["name"] != "CAROM_SIMULATOR__ACCESS__TOKEN"]

    problems = _k8s_with(tls_docs, no_token)
    assert any("would not start" in p for p in problems), problems


def test_readme_deploy_sections_match_the_files(tls_docs: Docs) -> None:
    """The commands in README.md's deploy sections name files, overlays and ports that exist."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploy with docker-compose") : readme.index("## Benchmarks")]
    for dockerfile in re.findall(r"-f (\S+/Dockerfile)", section):
        assert (ROOT / dockerfile).is_file(), dockerfile
    for overlay in set(re.findall(r"k8s/(overlays/[\w-]+)", section)):
        assert overlay in KUSTOMIZATIONS, overlay
    assert (ROOT / "k8s" / "router-tls-secret.py").is_file()
    assert "k8s/simulator-token-secret.py" in section
    assert (ROOT / "k8s" / "simulator-token-secret.py").is_file()
    node_ports = {
        p["nodePort"]
        for d in tls_docs
        if d["kind"] == "Service" and d["spec"].get("type") == "NodePort"
        for p in d["spec"]["ports"]
    }
    mentioned = {int(p) for p in re.findall(r"\b(3\d{4})\b", section)}
    assert mentioned == node_ports
    for name in SERVICES:
        assert f"carom-{name}:dev" in section


def test_the_routes_both_services_read_are_checked(compose: dict[str, Any], tls_docs: Docs) -> None:
    """The router and the recorder read router/routes.yaml, from a path in their container."""

    def edit(docs: Docs) -> None:
        cm = next(d for d in docs if d["metadata"]["name"].startswith("channel-routes"))
        cm["data"]["routes.yaml"] += "\n# edited\n"

    problems = _k8s_with(tls_docs, edit)
    for name in ("router", "recorder"):
        assert any(f"Deployment/{name} " in p and "differs from router/routes.yaml" in p
                   for p in problems), problems  # fmt: skip

    def no_routes_volume(docs: Docs) -> None:
        # The image's copy is hidden by the ConfigMap mounted on /etc/carom.
        workload = next(d for d in docs if d["kind"] == "Deployment"
                        and d["metadata"]["name"] == "recorder")  # fmt: skip
        [config] = [v for v in workload["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == "config"]  # fmt: skip
        config["projected"]["sources"] = config["projected"]["sources"][:1]

    problems = _k8s_with(tls_docs, no_routes_volume)
    assert any("routes file /etc/carom/routes.yaml is not in the container" in p
               for p in problems), problems  # fmt: skip
    relative = {"CAROM_RECORDER__ROUTES_FILE": "router/routes.yaml"}
    problems = _compose_with(compose, lambda s: s["recorder"]["environment"].update(relative))
    assert any("routes file router/routes.yaml is relative" in p for p in problems), problems


def test_what_stops_scaling_is_caught(compose: dict[str, Any], tls_docs: Docs) -> None:
    """The recorder and the tracker scale (Key_Shared): own names, port ranges, shared volume."""
    problems = _compose_with(compose, lambda s: s["recorder"].update(container_name="rec"))
    assert any("container_name stops `--scale recorder=2`" in p for p in problems), problems
    problems = _compose_with(compose, lambda s: s["recorder"].update(ports=["8003:8003"]))
    assert any("one host port" in p for p in problems), problems
    problems = _compose_with(compose, lambda s: s["recorder"].pop("volumes"))
    assert any("out_dir /var/lib/carom/recordings is not a mounted volume" in p
               for p in problems), problems  # fmt: skip

    def no_volume(docs: Docs) -> None:
        _container(docs, "recorder")["volumeMounts"].pop()

    problems = _k8s_with(tls_docs, no_volume)
    assert any("Deployment/recorder" in p and "out_dir" in p for p in problems), problems
