"""The whole stack through a Pulsar broker outage of a minute: nothing accepted is lost or doubled.

Real simulator, router and tracker (separate processes), two Python client sessions streaming at
30 fps, and the real broker killed with SIGKILL mid-run, kept down for 60 s and started again on
the same data. The router and the simulator hold far fewer messages in memory than the outage
produces (``max_pending_messages`` 200), so their on-disk spools carry the rest.

Afterwards every frame due of every session has exactly one CSV row, no frame whose report
reached the broker within the join window is ``missed``, each service said once that the broker
was lost and once that it was back, and the clients were told.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pulsar
import pytest

from carom import schemas
from carom.signaling import SessionParams
from carom_client.session import CaromSession, RouterInfo
from carom_local import pulsar as local_pulsar
from carom_local.pulsar import Broker
from carom_runtime.pulsar_io import quiet_logger
from carom_tracker import csvrow
from tests.services import free_port, scrape, service, wait_until, wait_until_async

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

OUTAGE_S = 60.0
SESSIONS = 2
FPS = 30
WINDOW_MS = 1000  # the tracker's join window


def _kill_broker() -> None:
    """SIGKILL the local broker's whole process group, as a crash would."""
    pid = local_pulsar._pid()
    assert pid is not None, "the local broker is not running"
    os.killpg(pid, signal.SIGKILL)

    def gone() -> bool:
        local_pulsar._reap(pid)
        return local_pulsar._pid() is None

    wait_until(gone, "the broker gone after SIGKILL", timeout=20)


def _read_topic(broker: Broker, topic: str) -> list[tuple[bytes, int]]:
    """Every message on ``topic`` from the start, with its event time in ms (a reader, so no
    subscription is left)."""
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    try:
        reader = client.create_reader(topic, pulsar.MessageId.earliest)
        out = []
        while reader.has_message_available():
            msg = reader.read_next(10_000)
            out.append((msg.data(), msg.event_timestamp()))
        return out
    finally:
        client.close()


def _rows(path: Path) -> list[csvrow.Row]:
    with path.open(newline="") as f:
        return [csvrow.from_row(r) for r in csv.DictReader(f)]


def test_a_minute_without_the_broker_loses_no_frame_and_misses_none_falsely(
    pulsar_broker: Broker, tmp_path: Path
) -> None:
    if os.environ.get("PULSAR_URL"):
        pytest.fail("this test kills and restarts the local broker: unset PULSAR_URL")
    tag = uuid.uuid4().hex[:8]
    topics = {
        k: f"persistent://public/default/out-{k}-{tag}" for k in ("truth", "centroids", "errors")
    }
    common = ["--pulsar-url", pulsar_broker.service_url]
    common += [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    small = ["--pulsar-max-pending-messages", "200", "--pulsar-spool-dir", str(tmp_path / "spool")]
    window = ["--window-s", f"{WINDOW_MS / 1000}"]
    tracker_args = [*common, "--metrics-dir", str(tmp_path / "metrics"), "--run", "out",
                    "--subscription", f"out-{tag}", *window]  # fmt: skip
    sids = [f"out-{tag}-{i}" for i in range(SESSIONS)]

    async def run(router_url: str) -> list[CaromSession]:
        info = await RouterInfo.fetch(router_url)
        sessions = [CaromSession(info, sid, SessionParams(fps=FPS)) for sid in sids]
        await asyncio.gather(*(s.open() for s in sessions))
        try:
            # Kept: the sessions stream 4 s before the outage (the frames due are checked against
            # the run's length).
            await asyncio.sleep(4.0)
            before = [len(s.live_errors) for s in sessions]
            assert all(n > 0 for n in before), before  # live results flowed before the outage
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _kill_broker)
            down_at = time.monotonic()
            await asyncio.sleep(OUTAGE_S)  # the outage
            await loop.run_in_executor(None, lambda: local_pulsar.start(timeout=180, quiet=True))
            print(f"\nbroker down {time.monotonic() - down_at:.1f} s (restart included)")

            # Live results resume once every producer has reconnected and its queue is out.
            def since() -> list[int]:
                return [len(s.live_errors) - n for s, n in zip(sessions, before, strict=True)]

            await wait_until_async(
                lambda: min(since()) > FPS * OUTAGE_S,
                lambda: f"the outage's live results at each session (new since: {since()})",
                timeout=150,
                every=0.5,
            )
            await asyncio.sleep(3.0)  # kept: the sessions stream on a while after the catch-up
        finally:
            # The end comes once the tracker has every frame due's row: after an outage on a slow
            # run here, not within 60 s.
            await asyncio.gather(*(s.close(drain_timeout=180) for s in sessions))
        return sessions

    logs = tmp_path
    sim_port = free_port()
    with (
        service("carom_simulator", [*common, *small], sim_port, logs / "simulator.log") as sim,
        service("carom_tracker", tracker_args, free_port(), logs / "tracker.log") as tracker,
    ):
        args = [*common, *small, "--simulator-url", sim.url,
                "--webtransport-port", str(free_port(socket.SOCK_DGRAM))]  # fmt: skip
        with service("carom_router", args, free_port(), logs / "router.log") as router:
            with ThreadPoolExecutor(1) as pool:
                sessions = pool.submit(asyncio.run, run(router.url)).result(timeout=600)
            tracker_metrics = scrape(tracker.url)
            router_events = scrape(router.url).by("carom_router_events_total", "event")
        texts = {"simulator": sim.text(), "router": router.text(), "tracker": tracker.text()}

    # Each service said once that the broker was lost and once that it was back.
    for name, text in texts.items():
        assert text.count("Pulsar broker lost") >= 1, (name, text[-3000:])
        assert text.count("Pulsar broker back after") >= 1, (name, text[-3000:])
        print(f"{name}: " + " | ".join(
            line.split(": ", 1)[-1] for line in text.splitlines() if "Pulsar broker" in line
        ))  # fmt: skip

    # When each report and each truth was accepted (its event time, stamped by the router and the
    # simulator): the tracker's join window runs on these.
    reported = {
        (c.session_id, c.rtp_ts): event_ms
        for data, event_ms in _read_topic(pulsar_broker, topics["centroids"])
        if isinstance(c := schemas.decode(data, schemas.Centroid), schemas.Centroid)
    }
    rendered = {
        (t.session_id, t.rtp_ts): event_ms
        for data, event_ms in _read_topic(pulsar_broker, topics["truth"])
        if isinstance(t := schemas.decode_truth_topic(data), schemas.Truth)
    }
    results = [
        schemas.decode_errors_topic(d) for d, _ in _read_topic(pulsar_broker, topics["errors"])
    ]
    frame_results = [r for msg in results for r in schemas.results_in(msg)]
    for s in sessions:
        told = [(st.state, st.part) for _, st in s.statuses if st.part == "broker"]
        print(f"{s.session_id} was told: {told}")
        assert ("degraded", "broker") in told and told[-1] == ("recovered", "broker"), told
        assert s.end is not None and s.end.complete, (s.session_id, s.end)
        due = s.end.frames_due
        assert due is not None and due >= FPS * (OUTAGE_S + 5), due
        rows = [r for r in _rows(tmp_path / "metrics" / "out" / f"{s.session_id}.csv")
                if r.status != "orphan"]  # fmt: skip
        frames = Counter(r.frame for r in rows)
        assert set(frames) == set(range(due)), sorted(set(range(due)) - set(frames))[:10]
        assert max(frames.values()) == 1, [f for f, n in frames.items() if n > 1][:10]
        statuses = Counter(r.status for r in rows)
        # A missed frame whose report reached the broker: how late the router accepted it after
        # the simulator accepted the frame's truth. Later than the join window, the report came
        # too late and ``missed`` is the truth (a starved runner's router, busy with the catch-up,
        # took 1 s once); within the window less its lead (the join clock may run that far ahead
        # of one topic), it is a false miss: the tracker lost a frame that was in time.
        late_by = {
            r.frame: reported[key] - rendered[key]
            for r in rows
            if r.status == "missed" and (key := (s.session_id, r.rtp_ts)) in reported
        }
        false_misses = [f for f, ms in late_by.items() if ms < WINDOW_MS * 3 / 4]
        print(f"{s.session_id}: {due} frames due, {dict(statuses)}; "
              f"{len(s.live_errors)} live results; missed with a report on the topic: "
              f"{late_by} (ms late); false misses {len(false_misses)}")  # fmt: skip
        assert not false_misses, {f: late_by[f] for f in false_misses[:10]}
        live = Counter(r.frame for r in frame_results if r.session_id == s.session_id)
        assert max(live.values()) == 1  # no live result twice
        # ... and every one reached the client, the catch-up burst included (the router holds
        # what aioquic's datagram queue cannot take yet, and sends the end after it).
        got = {e.frame for e in s.live_errors}
        assert got == set(range(due)), (len(got), due, sorted(set(range(due)) - got)[:10])
    tracker_metrics.get("carom_tracker_broker_outages_total")  # fails if absent
    held = {k: v for k, v in router_events.items() if k.startswith("errors_")}
    print(f"router: {held}")
    assert "errors_not_sent" not in held, held
