"""The consumer/producer CLI as a user runs it: subprocesses against a real broker.

The output format is also checked in memory against Pulsar 4.0's ``pulsar-client consume``
(``AbstractCmdConsume.interpretMessage``), line for line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pulsar
import pytest

from carom import schemas
from carom_cli.main import (
    MESSAGE_BOUNDARY,
    Received,
    admin_path,
    json_line,
    message_id_text,
    pulsar_date,
    pulsar_lines,
)
from carom_local.pulsar import Broker
from carom_runtime.pulsar_io import quiet_logger
from tests.carom.test_schemas import centroid, error, truth
from tests.services import wait_until

#: ``publishTime:[ms], eventTime:[ms], key:[...], properties:[...], content:...``
PULSAR_LINE = re.compile(
    r"^publishTime:\[(\d+)\], eventTime:\[(\d+)\], key:\[(.*?)\], properties:\[(.*?)\], "
    r"content:(.*)$"
)
ID = r"\d+:\d+:-1"


def run(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from carom_cli.main import consume_main, produce_main; "
            f"{'produce_main' if args[0] == 'produce' else 'consume_main'}()",
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def blocks(stdout: str) -> list[str]:
    """The message lines of ``pulsar-client consume`` output, each after its boundary line."""
    lines = stdout.splitlines()
    assert lines[::2] == [MESSAGE_BOUNDARY] * (len(lines) // 2), stdout
    assert len(lines) % 2 == 0, stdout
    return lines[1::2]


def subscriptions(broker: Broker, topic: str) -> list[str]:
    with urllib.request.urlopen(
        f"{broker.admin_url}/admin/v2/{admin_path(topic)}/subscriptions", timeout=10
    ) as r:
        names: list[str] = json.loads(r.read())
    return names


def consumers(broker: Broker, topic: str) -> dict[str, int]:
    """Consumers attached to each of the topic's subscriptions, a reader's included (none yet: the
    topic is made on the first subscribe)."""
    try:
        with urllib.request.urlopen(
            f"{broker.admin_url}/admin/v2/{admin_path(topic)}/stats", timeout=10
        ) as r:
            stats = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise
    return {name: len(sub.get("consumers", [])) for name, sub in stats["subscriptions"].items()}


def received(**kw: object) -> Received:
    base: dict[str, object] = dict(
        message_id="10:0:-1",
        publish_ms=1_764_665_818_123,
        event_ms=0,
        key="s-1",
        properties={},
        data=b'{"x":320.123456789012}',
        producer_name="standalone-0-3",
        redelivery_count=0,
        ordering_key="",
        schema_version="",
    )
    base.update(kw)
    return Received(**base)  # type: ignore[arg-type]


# --- the format, in memory -----------------------------------------------------------------------


def test_lines_are_pulsar_client_consume_lines() -> None:
    # Pulsar 4.0: key:[null] without a key, properties always printed, payload verbatim.
    assert pulsar_lines(received(key=None)) == (
        "----- got message -----\n"
        "publishTime:[1764665818123], eventTime:[0], key:[null], properties:[], "
        'content:{"x":320.123456789012}'
    )
    line = pulsar_lines(received(event_ms=1_764_665_818_120, properties={"a": "1", "b": "2"}))
    assert line.splitlines()[1] == (
        "publishTime:[1764665818123], eventTime:[1764665818120], key:[s-1], "
        'properties:[a=1, b=2], content:{"x":320.123456789012}'
    )


def test_print_metadata_appends_what_pulsar_appends() -> None:
    line = pulsar_lines(received(message_id="10:3:-1:2", redelivery_count=1), True)
    assert line.splitlines()[1].endswith(
        'content:{"x":320.123456789012}, event-time:'
        + pulsar_date(0)
        + ", message-id:10:3:-1:2, producer-name:standalone-0-3, redelivery-count:1, "
        "ordering-key:, schema-version:"
    )


def test_message_ids_and_dates_as_java_prints_them() -> None:
    assert message_id_text(10, 0, -1, -1) == "10:0:-1"  # MessageIdImpl
    assert message_id_text(10, 0, -1, 0) == "10:0:-1:0"  # BatchMessageIdImpl
    assert message_id_text(7, 12, 3, 5) == "7:12:3:5"
    # DateFormatter: ISO_OFFSET_DATE_TIME, Z at UTC, the fraction only when not 0.
    assert pulsar_date(0, dt.UTC) == "1970-01-01T00:00:00Z"
    assert pulsar_date(1_764_665_818_120, dt.UTC) == "2025-12-02T08:56:58.12Z"
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert pulsar_date(1_764_665_818_123, plus2) == "2025-12-02T10:56:58.123+02:00"
    minus = dt.timezone(-dt.timedelta(hours=5, minutes=30))
    assert pulsar_date(1_764_665_818_000, minus) == "2025-12-02T03:26:58-05:30"


def test_json_keeps_full_floats_and_pulsar_ids() -> None:
    msg = truth(x=320.123456789012, y=0.1 + 0.2)
    out = json.loads(json_line(received(data=schemas.encode(msg)), "t", schemas.TruthTopic))
    assert out["message_id"] == "10:0:-1"
    assert out["publish_time"] == 1_764_665_818_123
    assert out["message"]["x"] == 320.123456789012
    assert out["message"]["y"] == 0.1 + 0.2
    bad = json.loads(json_line(received(key=None), "t", schemas.TruthTopic))
    assert bad["key"] is None and "invalid" in bad and bad["raw"] == '{"x":320.123456789012}'


# --- against a real broker -----------------------------------------------------------------------


@pytest.mark.integration
def test_consume_prints_what_was_produced(pulsar_broker: Broker, topic: str) -> None:
    msgs = [truth(frame=i, rtp_ts=1000 + 1500 * i, x=320.123456789012 + i) for i in range(3)]
    before_ms = time.time_ns() // 1_000_000
    p = run(
        "produce",
        topic,
        "--url",
        pulsar_broker.service_url,
        *[a for m in msgs for a in ("-m", schemas.encode(m).decode())],
    )
    assert p.returncode == 0, p.stderr
    assert "3 messages produced" in p.stdout
    after_ms = time.time_ns() // 1_000_000

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
    assert all(re.fullmatch(ID, line["message_id"]) for line in lines)  # Carom does not batch
    assert all(before_ms <= line["publish_time"] <= after_ms for line in lines)
    assert c.stderr.splitlines() == ["3 messages successfully consumed"]

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
    shown = [PULSAR_LINE.match(line) for line in blocks(h.stdout)]
    assert all(shown) and len(shown) == 2, h.stdout
    for m, msg in zip(shown, msgs, strict=False):
        assert m is not None
        assert before_ms <= int(m[1]) <= after_ms
        assert (m[2], m[3], m[4]) == ("0", "s-1", "")
        assert m[5] == schemas.encode(msg).decode()  # the payload as sent: every digit
    assert "x=320.123456789012" not in h.stdout and '"x":320.123456789012' in h.stdout
    # Pulsar's closing line, then the one warning: the subscription stays behind.
    err = h.stderr.splitlines()
    assert err[0] == "2 messages successfully consumed"
    assert h.stderr.count("is durable") == 1
    assert "'cli-test'" in err[1] and topic in err[1]
    assert "-s cli-test --delete-subscription" in err[2]
    assert subscriptions(pulsar_broker, topic) == ["cli-test"]

    d = run(
        "consume",
        topic,
        "--admin-url",
        pulsar_broker.admin_url,
        "-s",
        "cli-test",
        "--delete-subscription",
    )
    assert d.returncode == 0, d.stderr
    assert "subscription 'cli-test' deleted" in d.stdout
    assert subscriptions(pulsar_broker, topic) == []
    again = run(
        "consume",
        topic,
        "--admin-url",
        pulsar_broker.admin_url,
        "-s",
        "cli-test",
        "--delete-subscription",
    )
    assert again.returncode == 1
    assert again.stderr.startswith("carom-consume: cannot delete subscription 'cli-test'")
    assert "(404)" in again.stderr


@pytest.mark.integration
def test_unsubscribe_on_exit_leaves_nothing(pulsar_broker: Broker, topic: str) -> None:
    p = run(
        "produce", topic, "--url", pulsar_broker.service_url, "-m", schemas.encode(truth()).decode()
    )
    assert p.returncode == 0, p.stderr
    c = run(
        "consume",
        topic,
        "--url",
        pulsar_broker.service_url,
        "-p",
        "Earliest",
        "-s",
        "gone",
        "--unsubscribe-on-exit",
    )
    assert c.returncode == 0, c.stderr
    assert len(blocks(c.stdout)) == 1
    assert c.stderr.splitlines() == [
        "1 messages successfully consumed",
        f"carom-consume: subscription 'gone' deleted from {topic}",
    ]
    assert subscriptions(pulsar_broker, topic) == []


@pytest.mark.integration
def test_keys_properties_event_times_and_ids(pulsar_broker: Broker, topic: str) -> None:
    # Messages no Carom service sends (no key, properties, an event time, a batch), sent with the
    # Python client: what `pulsar-client consume -mp` would show for them.
    client = pulsar.Client(pulsar_broker.service_url, logger=quiet_logger(100))
    try:
        plain = client.create_producer(topic, batching_enabled=False)
        first = plain.send(
            b"not carom", properties={"a": "1", "b": "2"}, event_timestamp=1_764_665_818_120
        )
        batched = client.create_producer(topic, batching_enabled=True)
        second = batched.send(schemas.encode(centroid()), partition_key="s-1")
        name = batched.producer_name()
    finally:
        client.close()
    c = run(
        "consume",
        topic,
        "--url",
        pulsar_broker.service_url,
        "-p",
        "Earliest",
        "-n",
        "2",
        "-mp",
        env={"TZ": "UTC"},
    )
    assert c.returncode == 0, c.stderr
    one, two = blocks(c.stdout)
    first_id = message_id_text(
        first.ledger_id(), first.entry_id(), first.partition(), first.batch_index()
    )
    assert re.fullmatch(ID, first_id)
    assert re.fullmatch(
        r"publishTime:\[\d{13}\], eventTime:\[1764665818120\], key:\[null\], "
        r"properties:\[a=1, b=2\], content:not carom, event-time:2025-12-02T08:56:58.12Z, "
        rf"message-id:{first_id}, producer-name:\S+, redelivery-count:0, ordering-key:, "
        "schema-version:",
        one,
    ), one
    second_id = f"{second.ledger_id()}:{second.entry_id()}:-1:0"
    assert re.fullmatch(
        r"publishTime:\[\d{13}\], eventTime:\[0\], key:\[s-1\], properties:\[\], "
        + re.escape(f"content:{schemas.encode(centroid()).decode()}, ")
        + "event-time:1970-01-01T00:00:00Z, "
        + re.escape(f"message-id:{second_id}, producer-name:{name}, ")
        + "redelivery-count:0, ordering-key:, schema-version:",
        two,
    ), two
    # The payload that is no Carom message is shown as it is, and flagged beside it.
    err = c.stderr.splitlines()
    assert err[0].startswith(f"carom-consume: message {first_id}: invalid carom message")
    assert err[1:] == ["2 messages successfully consumed"]


@pytest.mark.integration
def test_alias_topics_and_all_kinds(pulsar_broker: Broker, topic: str) -> None:
    # A full topic name decodes any kind; a kind without a session goes without a key.
    status = schemas.TrackerStatus(tracker="t-1", t_ns=1, interval_ms=1000)
    for msg in (centroid(), error(), status):
        p = run(
            "produce", topic, "--url", pulsar_broker.service_url, "-m", schemas.encode(msg).decode()
        )
        assert p.returncode == 0, p.stderr
    c = run("consume", topic, "--url", pulsar_broker.service_url, "-p", "Earliest", "-n", "3")
    assert c.returncode == 0, c.stderr
    shown = [PULSAR_LINE.match(line) for line in blocks(c.stdout)]
    assert [(m[3], json.loads(m[5])["kind"]) for m in shown if m] == [
        ("s-1", "centroid"),
        ("s-1", "error"),
        ("null", "tracker_status"),
    ]
    assert c.stderr.splitlines() == ["3 messages successfully consumed"]


@pytest.mark.integration
def test_produce_refuses_invalid_messages(pulsar_broker: Broker, topic: str) -> None:
    bad = json.loads(schemas.encode(truth()))
    bad["x"] = -3
    p = run("produce", "truth", "--url", pulsar_broker.service_url, "-m", json.dumps(bad))
    assert p.returncode == 2
    assert "`$.x`" in p.stderr


def test_subscription_flags_need_a_subscription() -> None:
    c = run("consume", "truth", "--delete-subscription")
    assert c.returncode == 2
    assert "need -s NAME" in c.stderr


@pytest.mark.integration
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
    d = run(
        "consume", "truth", "--admin-url", "http://127.0.0.1:1", "-s", "x", "--delete-subscription"
    )
    assert d.returncode == 1
    assert d.stderr.startswith("carom-consume: cannot reach the Pulsar admin API")
    assert len(d.stderr.strip().splitlines()) == 1


@pytest.mark.integration
@pytest.mark.parametrize("subscription", [None, "ctrl-c"])
def test_ctrl_c_ends_consume_cleanly(
    pulsar_broker: Broker, topic: str, subscription: str | None
) -> None:
    extra = ["-s", subscription, "--unsubscribe-on-exit"] if subscription else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from carom_cli.main import consume_main; consume_main()",
            topic,
            "--url",
            pulsar_broker.service_url,
            "-n",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Subscribed (or reading) and waiting for messages: the broker has the consumer.
        wait_until(
            lambda: proc.poll() is not None or any(consumers(pulsar_broker, topic).values()),
            "carom-consume attached to the topic",
        )
        # Kept: the broker lists the consumer a moment before the command's receive loop is
        # entered, and nothing outside shows that loop; Ctrl-C must land while it waits.
        time.sleep(0.5)
        assert proc.poll() is None
        if subscription:
            assert subscriptions(pulsar_broker, topic) == [subscription]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err.splitlines()[0] == "0 messages successfully consumed"
    if subscription:
        assert subscriptions(pulsar_broker, topic) == []
        assert "deleted" in err and "is durable" not in err


def test_admin_paths() -> None:
    assert admin_path("persistent://public/default/carom-truth") == (
        "persistent/public/default/carom-truth"
    )
    assert admin_path("my-topic") == "persistent/public/default/my-topic"
    assert admin_path("non-persistent://t/ns/a b") == "non-persistent/t/ns/a%20b"
    with pytest.raises(ValueError):
        admin_path("persistent://public/x")
    assert urllib.parse.unquote(admin_path("t/ns/x")) == "persistent/t/ns/x"
