"""k8s/components/pulsar-cluster: a real Apache Pulsar cluster instead of the standalone, checked
offline against local/pulsar cluster (its files and carom_local.cluster), each check also shown to
fail on a broken copy.

The schemas and the services' settings of overlays/minikube-cluster are checked with every other
kustomization (test_k8s.py, test_drift.py); here: what only the cluster has.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from carom_local import cluster
from tests.deploy.deployfiles import (
    CLUSTER_CONTAINER_KEYS,
    CLUSTER_ROLES,
    K8S,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    SERVICES,
    Workload,
    cluster_brokers,
    cluster_conf,
    k8s_containers,
    k8s_problems,
    kustomize,
    pod_env,
    pulsar_version,
    settings_of,
    url_hosts,
    workloads,
)

Docs = list[dict[str, Any]]
OVERLAY = "overlays/minikube-cluster"
#: The partition count the component gives Carom's three topics.
PARTITIONS = 4
HOSTNAME = "kubernetes.io/hostname"


@pytest.fixture(scope="module")
def cluster_docs() -> Docs:
    return kustomize(OVERLAY)


@pytest.fixture(scope="module")
def component_docs(tmp_path_factory: pytest.TempPathFactory) -> Docs:
    """The component as written (required anti-affinity), added to the base as its comment says."""
    tmp = tmp_path_factory.mktemp("pulsar-cluster")
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", tmp)],
        "components": [os.path.relpath(K8S / "components" / "pulsar-cluster", tmp)],
    }
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return kustomize(str(tmp))


def _doc(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    return next(
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["name"].startswith(name)
        # generated ConfigMaps carry a hash suffix
        and d["metadata"]["name"].removeprefix(name)[:1] in ("", "-")
    )


def _problems_with(docs: Docs, change: Callable[[Docs], object]) -> list[str]:
    broken = copy.deepcopy(docs)
    change(broken)
    return k8s_problems(broken)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_the_overlay_is_checked_with_the_others() -> None:
    assert OVERLAY in KUSTOMIZATIONS


def test_no_standalone_remains(cluster_docs: Docs) -> None:
    assert not [
        d for d in cluster_docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "pulsar"
    ]
    assert not [d for d in cluster_docs if d["metadata"]["name"].startswith("pulsar-env")]
    for d in cluster_docs:
        if d["kind"] in ("StatefulSet", "Deployment", "Job"):
            for c in _containers(d):
                assert "standalone" not in " ".join(c.get("command", []) + c.get("args", []))
    # The name `pulsar` is now the ready brokers behind one cluster IP (Carom's admin_url).
    pulsar = _doc(cluster_docs, "Service", "pulsar")
    assert pulsar["spec"].get("clusterIP") != "None"
    assert "publishNotReadyAddresses" not in pulsar["spec"]
    assert (
        pulsar["spec"]["selector"]
        == _doc(cluster_docs, "StatefulSet", "broker")["spec"]["selector"]["matchLabels"]
    )
    # ... and the standalone overlays still run the standalone.
    standalone = kustomize("overlays/minikube")
    assert [d["metadata"]["name"] for d in standalone if d["kind"] == "StatefulSet"] == ["pulsar"]


def test_every_service_uses_the_brokers_with_4_partitions(cluster_docs: Docs) -> None:
    brokers = [(b, 6650) for b in cluster_brokers()]
    assert brokers == [("broker-0.broker", 6650), ("broker-1.broker", 6650)]
    seen = set()
    for _, c, _ in k8s_containers(cluster_docs):
        pulsar = settings_of(c).pulsar
        seen.add(c.service.name)
        assert url_hosts(pulsar.url) == brokers, c.where
        assert url_hosts(pulsar.admin_url) == [("pulsar", 8080)], c.where
        assert pulsar.partitions == PARTITIONS, c.where
    assert seen == set(SERVICES)
    # The standalone overlays keep one broker and non-partitioned topics.
    for _, c, _ in k8s_containers(kustomize("overlays/minikube")):
        pulsar = settings_of(c).pulsar
        assert (pulsar.url, pulsar.partitions) == ("pulsar://pulsar:6650", 0), c.where


def test_a_service_url_missing_a_broker_is_caught(cluster_docs: Docs) -> None:
    def one_broker(docs: Docs) -> None:
        env = _doc(docs, "Deployment", "tracker")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
        item = next(e for e in env if e["name"] == "CAROM_TRACKER__PULSAR__URL")
        item["value"] = "pulsar://broker-0.broker:6650"

    problems = _problems_with(cluster_docs, one_broker)
    assert any("tracker" in p and "does not list every broker" in p for p in problems), problems

    def no_such_pod(docs: Docs) -> None:
        env = _doc(docs, "Deployment", "router")["spec"]["template"]["spec"]["containers"][0]["env"]
        item = next(e for e in env if e["name"] == "CAROM_ROUTER__PULSAR__URL")
        item["value"] = "pulsar://broker-0.broker:6650,broker-2.broker:6650"

    problems = _problems_with(cluster_docs, no_such_pod)
    assert any("broker-2.broker:6650 is no Service port" in p for p in problems), problems


def pdb_and_affinity_problems(docs: Docs, required: set[str]) -> list[str]:
    """Each cluster StatefulSet: exactly one PodDisruptionBudget (maxUnavailable 1) selecting its
    pods, and pod anti-affinity on the node's host name against its own pods, required for the
    roles in ``required`` (preferred is enough for the others)."""
    problems = []
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for w in workloads(docs):
        if w.kind != "StatefulSet" or w.name not in CLUSTER_ROLES:
            continue
        labels = w.pod["metadata"]["labels"]
        mine = [
            p
            for p in pdbs
            if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
            and p["metadata"].get("namespace") == w.doc["metadata"].get("namespace")
        ]
        if [p["spec"].get("maxUnavailable") for p in mine] != [1]:
            problems.append(f"{w.name}: needs one PodDisruptionBudget with maxUnavailable 1")
        anti = w.spec.get("affinity", {}).get("podAntiAffinity", {})
        hard = anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        soft = [
            t["podAffinityTerm"]
            for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ]
        terms = hard if w.name in required else hard + soft
        if not any(_spreads(t, w) for t in terms):
            kind = "required " if w.name in required else ""
            problems.append(f"{w.name}: no {kind}anti-affinity on {HOSTNAME} against its own pods")
    missing = set(CLUSTER_ROLES) - {w.name for w in workloads(docs)}
    problems += [f"{name}: no StatefulSet" for name in sorted(missing)]
    return problems


def _spreads(term: dict[str, Any], w: Workload) -> bool:
    selector = term.get("labelSelector", {}).get("matchLabels", {})
    own = w.doc["spec"]["selector"]["matchLabels"]
    return (
        term.get("topologyKey") == HOSTNAME and bool(selector) and selector.items() <= own.items()
    )


def test_every_cluster_statefulset_has_a_pdb_and_anti_affinity(
    cluster_docs: Docs, component_docs: Docs
) -> None:
    # As written, for a cluster of nodes: one ZooKeeper server and one bookie per node.
    assert pdb_and_affinity_problems(component_docs, required={"zookeeper", "bookie"}) == []
    # The one-node minikube overlay keeps the same terms, preferred.
    assert pdb_and_affinity_problems(cluster_docs, required=set()) == []
    problems = pdb_and_affinity_problems(cluster_docs, required={"zookeeper", "bookie"})
    assert len(problems) == 2, problems

    def no_bookie_pdb(docs: Docs) -> None:
        docs.remove(_doc(docs, "PodDisruptionBudget", "bookie"))

    broken = copy.deepcopy(component_docs)
    no_bookie_pdb(broken)
    assert pdb_and_affinity_problems(broken, {"zookeeper", "bookie"}) == [
        "bookie: needs one PodDisruptionBudget with maxUnavailable 1"
    ]
    broken = copy.deepcopy(component_docs)
    _doc(broken, "StatefulSet", "broker")["spec"]["template"]["spec"].pop("affinity")
    assert pdb_and_affinity_problems(broken, {"zookeeper", "bookie"}) == [
        f"broker: no anti-affinity on {HOSTNAME} against its own pods"
    ]


def test_the_component_alone_passes_the_schemas_and_the_checks(component_docs: Docs) -> None:
    """The component added to the base (not only through the minikube overlay)."""
    for doc in component_docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "carom", doc["metadata"]["name"]
    assert k8s_problems(component_docs) == []


def test_every_key_of_the_cluster_files_is_in_the_pods(cluster_docs: Docs) -> None:
    """Each key of local/pulsar-dist/cluster/*.conf reaches its pods (PULSAR_PREFIX_<key>) with the
    file's value, except the keys of addresses, ports, folders and the metadata store."""
    for role in CLUSTER_ROLES:
        sts = _doc(cluster_docs, "StatefulSet", role)
        pod = f"{role}-1"
        env = pod_env(
            sts["spec"]["template"]["spec"]["containers"][0],
            {"metadata": {"name": pod}},
            cluster_docs,
        )
        local = cluster_conf(role)
        assert local, role
        for key, value in local.items():
            wanted = CLUSTER_CONTAINER_KEYS[role].get(key, value).format(pod=pod)
            assert env.get(f"PULSAR_PREFIX_{key}") == wanted, (role, key)
        # What a pod sets differently is what local/pulsar cluster sets per node, plus addresses.
        node = next(n for n in cluster.NODES if n.role == role)
        assert set(cluster.node_keys(node)) <= set(CLUSTER_CONTAINER_KEYS[role]), role
        assert set(CLUSTER_CONTAINER_KEYS[role]) <= set(local) | set(cluster.node_keys(node)), role
    broker = cluster_conf("broker")
    assert broker["clusterName"] == cluster.CLUSTER == "carom"
    assert (
        broker["managedLedgerDefaultEnsembleSize"],
        broker["managedLedgerDefaultWriteQuorum"],
        broker["managedLedgerDefaultAckQuorum"],
    ) == ("3", "2", "2")
    assert broker["metadataStoreSessionTimeoutMillis"] == "6000"
    # Each broker advertises its own pod's name.
    broker_env = _doc(cluster_docs, "StatefulSet", "broker")["spec"]["template"]["spec"][
        "containers"
    ][0]
    for i in range(2):
        env = pod_env(broker_env, {"metadata": {"name": f"broker-{i}"}}, cluster_docs)
        assert env["PULSAR_PREFIX_advertisedAddress"] == f"broker-{i}.broker"


def _env_map(docs: Docs, name: str) -> dict[str, str]:
    data: dict[str, str] = _doc(docs, "ConfigMap", name)["data"]
    return data


@pytest.mark.parametrize(
    ("configmap", "key", "value"),
    [
        ("broker-env", "PULSAR_PREFIX_metadataStoreSessionTimeoutMillis", None),
        ("broker-env", "PULSAR_PREFIX_managedLedgerDefaultAckQuorum", "1"),
        ("broker-env", "PULSAR_PREFIX_loadBalancerEnabled", "false"),  # a key the file lacks
        ("broker-env", "PULSAR_PREFIX_clusterName", "standalone"),
        ("broker-env", "PULSAR_PREFIX_bindAddress", "127.0.0.1"),
        ("bookie-env", "PULSAR_PREFIX_journalSyncData", "true"),
        ("bookie-env", "PULSAR_PREFIX_useHostNameAsBookieID", "false"),
        ("bookie-env", "PULSAR_PREFIX_listeningInterface", "lo"),
        ("zookeeper-env", "PULSAR_PREFIX_minSessionTimeout", None),
        ("zookeeper-env", "PULSAR_MEM", "-Xmx2g"),
    ],
    ids=lambda v: v.removeprefix("PULSAR_PREFIX_") if isinstance(v, str) else "removed",
)
def test_cluster_config_drift_is_caught(
    cluster_docs: Docs, configmap: str, key: str, value: str | None
) -> None:
    def change(docs: Docs) -> None:
        data = _env_map(docs, configmap)
        if value is None:
            data.pop(key)
        else:
            data[key] = value

    problems = _problems_with(cluster_docs, change)
    assert any(key.removeprefix("PULSAR_PREFIX_") in p for p in problems), problems


def test_cluster_wiring_drift_is_caught(cluster_docs: Docs) -> None:
    def broker_advertises(docs: Docs) -> None:
        env = _doc(docs, "StatefulSet", "broker")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
        next(e for e in env if e["name"] == "PULSAR_PREFIX_advertisedAddress")["value"] = "pulsar"

    problems = _problems_with(cluster_docs, broker_advertises)
    assert any("advertisedAddress=pulsar" in p for p in problems), problems

    def five_servers(docs: Docs) -> None:
        _doc(docs, "StatefulSet", "zookeeper")["spec"]["replicas"] = 5

    problems = _problems_with(cluster_docs, five_servers)
    assert any("5 replicas" in p for p in problems), problems
    assert any("ZOOKEEPER_SERVERS" in p for p in problems), problems

    def not_headless(docs: Docs) -> None:
        _doc(docs, "Service", "bookie")["spec"].pop("clusterIP")

    problems = _problems_with(cluster_docs, not_headless)
    assert any("StatefulSet/bookie" in p and "headless" in p for p in problems), problems

    def no_rocksdb_step(docs: Docs) -> None:
        c = _doc(docs, "StatefulSet", "bookie")["spec"]["template"]["spec"]["containers"][0]
        c["args"] = ["exec bin/pulsar bookie"]

    problems = _problems_with(cluster_docs, no_rocksdb_step)
    assert any("StatefulSet/bookie: does not run" in p for p in problems), problems

    def other_image(docs: Docs) -> None:
        spec = _doc(docs, "StatefulSet", "broker")["spec"]["template"]["spec"]
        spec["initContainers"][0]["image"] = "apachepulsar/pulsar:4.0.8"

    problems = _problems_with(cluster_docs, other_image)
    assert any("wait-for-cluster-metadata" in p for p in problems), problems


def test_the_metadata_job_runs_local_clusters_command(cluster_docs: Docs) -> None:
    job = _doc(cluster_docs, "Job", "cluster-metadata")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    # It waits for ZooKeeper, then writes the metadata (idempotent: safe to run again).
    assert script.index("zookeeper-shell") < script.index("initialize-cluster-metadata")

    def edit_args(old: str, new: str) -> Callable[[Docs], None]:
        def change(docs: Docs) -> None:
            c = _doc(docs, "Job", "cluster-metadata")["spec"]["template"]["spec"]["containers"][0]
            c["args"] = [a.replace(old, new) for a in c["args"]]

        return change

    problems = _problems_with(cluster_docs, edit_args("--cluster carom", "--cluster other"))
    assert any("--cluster other" in p for p in problems), problems
    problems = _problems_with(cluster_docs, edit_args(" --default-namespace-bundle-number 4", ""))
    assert any("not local/pulsar cluster's" in p for p in problems), problems
    problems = _problems_with(
        cluster_docs, edit_args("broker-1.broker:6650", "broker-1.broker:6651")
    )
    assert any("--broker-service-url" in p for p in problems), problems
    problems = _problems_with(cluster_docs, edit_args("zookeeper-shell", "true"))
    assert any("must wait for ZooKeeper" in p for p in problems), problems


def test_the_cluster_is_pinned_to_the_one_pulsar_version(cluster_docs: Docs) -> None:
    images = {
        c["image"]
        for d in cluster_docs
        if d["kind"] in ("StatefulSet", "Job")
        for c in _containers(d)
    }
    assert images == {f"apachepulsar/pulsar:{pulsar_version()}"}
