"""``local/pulsar cluster``: what each node runs with (pure), and the cluster itself (marked).

The cluster's own start, ready check and node kill/restart run in the ``cluster`` lane
(``./local/test --cluster``), with tests/faults/test_cluster_failover.py.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from carom_local import cluster
from carom_local import pulsar as local_pulsar


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cluster state folder of the test's own (the overrides file lives there)."""
    monkeypatch.setattr(cluster, "STATE", tmp_path)
    yield tmp_path


def test_every_node_has_its_own_ports_and_folders() -> None:
    ports = [n.port for n in cluster.NODES] + [b.admin_port for b in cluster.BROKER_NODES]
    assert len(ports) == len(set(ports)) == 8
    standalone_ports = {local_pulsar.BROKER_PORT, local_pulsar.ADMIN_PORT}
    assert not standalone_ports & set(ports)  # both can run at once
    assert len({n.home for n in cluster.NODES}) == len(cluster.NODES)
    assert [n.role for n in cluster.NODES].count("bookie") == 3
    assert [n.role for n in cluster.NODES].count("broker") == 2
    assert cluster.SERVICE_URL == "pulsar://127.0.0.1:6660,127.0.0.1:6661"


def test_a_node_runs_its_roles_file_then_its_own_keys(state: Path) -> None:
    bookie = cluster.node("bookie-2")
    conf = cluster.read_conf(_written(bookie))
    role = cluster.read_conf(cluster.CONF_DIR / "bookkeeper.conf")
    assert {k: conf[k] for k in role} | cluster.node_keys(bookie) == conf
    assert conf["bookiePort"] == "3192"
    assert conf["metadataServiceUri"] == "zk+null://127.0.0.1:2190/ledgers"
    assert conf["journalDirectories"].endswith("bookie-2/journal")
    broker = cluster.read_conf(_written(cluster.node("broker-1")))
    assert (broker["brokerServicePort"], broker["webServicePort"]) == ("6661", "8091")
    assert (
        broker["metadataStoreUrl"] == broker["configurationMetadataStoreUrl"] == "zk:127.0.0.1:2190"
    )
    assert broker["clusterName"] == cluster.CLUSTER
    zk = cluster.read_conf(_written(cluster.ZOOKEEPER))
    assert (zk["clientPort"], zk["clientPortAddress"]) == ("2190", "127.0.0.1")


def _written(n: cluster.Node) -> Path:
    path = n.home.parent / f"{n.name}.conf"
    path.write_text(cluster.render_conf(n))
    return path


def test_the_default_quorum_is_3_2_2_and_an_override_reaches_the_brokers_only(
    state: Path,
) -> None:
    broker = cluster.node("broker-0")
    conf = cluster.read_conf(_written(broker))
    quorum = [
        conf[f"managedLedgerDefault{k}"] for k in ("EnsembleSize", "WriteQuorum", "AckQuorum")
    ]
    assert quorum == ["3", "2", "2"]
    cluster.write_overrides(cluster.quorum_keys(2, 2, 1))
    conf = cluster.read_conf(_written(broker))
    assert conf["managedLedgerDefaultEnsembleSize"] == "2"
    assert conf["managedLedgerDefaultAckQuorum"] == "1"
    assert "managedLedgerDefaultEnsembleSize" not in cluster.render_conf(cluster.node("bookie-0"))


@pytest.mark.parametrize("quorum", [(2, 3, 2), (3, 2, 3), (4, 2, 2), (1, 1, 0)])
def test_a_quorum_bookkeeper_refuses_is_refused(quorum: tuple[int, int, int]) -> None:
    """ensemble >= write >= ack >= 1, and no ensemble larger than the bookies."""
    assert cluster.quorum_keys(3, 3, 2)["managedLedgerDefaultWriteQuorum"] == "3"
    with pytest.raises(cluster.ClusterError):
        cluster.quorum_keys(*quorum)


def test_a_bad_conf_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "x.conf"
    bad.write_text("# fine\nkey=value\nnot a pair\n")
    with pytest.raises(cluster.ClusterError, match="not a pair"):
        cluster.read_conf(bad)


def test_commands_name_each_roles_main_class_and_the_metadata_setup_names_every_broker() -> None:
    for n in cluster.NODES:
        argv = cluster.command(n, "java", "cp")
        assert cluster.MAIN[n.role] in argv and str(n.conf) in argv
    setup = cluster.metadata_command("java", "cp")
    assert "org.apache.pulsar.PulsarClusterMetadataSetup" in setup
    assert setup[setup.index("--broker-service-url") + 1] == cluster.SERVICE_URL
    assert setup[setup.index("--web-service-url") + 1] == ("http://127.0.0.1:8090,127.0.0.1:8091")


def test_an_unknown_node_is_named_with_the_known_ones() -> None:
    with pytest.raises(cluster.ClusterError, match="broker-0"):
        cluster.node("broker-9")


# -- the real cluster (the `cluster` lane) ---------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_cluster_serves_from_both_brokers_and_survives_a_restart() -> None:
    started = cluster.start(timeout=300, quiet=True)
    try:
        for url in cluster.ADMIN_URLS:
            assert sorted(cluster.active_brokers(url)) == ["127.0.0.1:8090", "127.0.0.1:8091"]
            with urllib.request.urlopen(f"{url}/admin/v2/bookies/all", timeout=10) as r:
                assert len(json.load(r)["bookies"]) == 3
        cluster.kill("broker-1")
        assert cluster.pid(cluster.node("broker-1")) is None
        assert cluster.restart("broker-1") < 120
        ok, lines = cluster.status()
        assert ok, lines
    finally:
        if started.started_here:
            cluster.stop()
