"""The consumer/producer CLI as a user runs it: subprocesses against a real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from carom import schemas
from carom_local.pulsar import Broker
from tests.carom.test_schemas import centroid, error, truth

pytestmark = pytest.mark.integration


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from carom.cli import consume_main, produce_main; "
            f"{'produce_main' if args[0] == 'produce' else 'consume_main'}()",
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_consume_prints_what_was_produced(pulsar_broker: Broker, topic: str) -> None:
    msgs = [truth(frame=i, rtp_ts=1000 + 1500 * i) for i in range(3)]
    p = run(
        "produce",
        topic,
        "--url",
        pulsar_broker.service_url,
        *[a for m in msgs for a in ("-m", schemas.encode(m).decode())],
    )
    assert p.returncode == 0, p.stderr
    assert "3 messages produced" in p.stdout

    c = run(
        "consume", topic, "--url", pulsar_broker.service_url, "-p", "Earliest", "-n", "3", "--json"
    )
    assert c.returncode == 0, c.stderr
    lines = [json.loads(line) for line in c.stdout.splitlines()]
    assert [
        schemas.build(schemas.Truth, **{k: v for k, v in line["message"].items() if k != "kind"})
        for line in lines
    ] == msgs
    assert all(line["key"] == "s-1" for line in lines)

    h = run(
        "consume",
        topic,
        "--url",
        pulsar_broker.service_url,
        "-p",
        "Earliest",
        "-n",
        "2",
        "-s",
        "cli-test",
        "-t",
        "Shared",
    )
    assert h.returncode == 0, h.stderr
    assert h.stdout.count("----- got message -----") == 2
    assert "truth: schema_version=1  session_id=s-1  frame=0" in h.stdout
    assert "x=320.250" in h.stdout


def test_alias_topics_and_all_kinds(pulsar_broker: Broker, topic: str) -> None:
    # A full topic name decodes any kind; invalid payloads are shown as such, not hidden.
    for msg in (centroid(), error()):
        p = run(
            "produce", topic, "--url", pulsar_broker.service_url, "-m", schemas.encode(msg).decode()
        )
        assert p.returncode == 0, p.stderr
    c = run("consume", topic, "--url", pulsar_broker.service_url, "-p", "Earliest", "-n", "2")
    assert c.returncode == 0, c.stderr
    assert "centroid: " in c.stdout and "error: " in c.stdout


def test_produce_refuses_invalid_messages(pulsar_broker: Broker, topic: str) -> None:
    bad = json.loads(schemas.encode(truth()))
    bad["x"] = -3
    p = run("produce", "truth", "--url", pulsar_broker.service_url, "-m", json.dumps(bad))
    assert p.returncode == 2
    assert "`$.x`" in p.stderr


def test_broker_down_gives_one_line_error(pulsar_broker: Broker) -> None:
    start = time.monotonic()
    c = run("consume", "truth", "--url", "pulsar://127.0.0.1:1", "--timeout", "3", "-n", "1")
    assert c.returncode != 0
    assert c.stdout == ""
    lines = c.stderr.strip().splitlines()
    assert len(lines) == 1, c.stderr
    assert lines[0].startswith("carom-consume: cannot reach Pulsar")
    assert "Traceback" not in c.stderr
    assert time.monotonic() - start < 30


def test_ctrl_c_ends_consume_cleanly(pulsar_broker: Broker, topic: str) -> None:
    import signal

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from carom.cli import consume_main; consume_main()",
            topic,
            "--url",
            pulsar_broker.service_url,
            "-n",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # subscribed and waiting for messages
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
