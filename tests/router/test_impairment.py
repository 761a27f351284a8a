"""A session's emulated network, end to end: real simulator, real router, a Python client.

Two sessions side by side for a few seconds, one on a clear loopback and one with a profile of
50 ms each way on all three paths (``SessionParams.network``). Each report carries the hops'
times on the server clock; the impaired session's video arrives later by the media path's delay,
and its reports reach the router later by the reports path's (its clock estimate stays right
because the delay is the same both ways). The bounds are wide (timings belong in ``bench/``):
what this shows is that each path is impaired, and only the session that asked.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import uuid
from collections.abc import Iterator

import msgspec
import pulsar
import pytest

from carom import schemas
from carom.impairment import Path as NetPath
from carom.impairment import Profile
from carom.signaling import SessionParams
from carom_client.session import CaromSession, RouterInfo
from carom_local.pulsar import Broker
from carom_runtime.ice import set_host_addresses
from carom_runtime.pulsar_io import quiet_logger
from tests.services import Running, free_port, scrape, service, wait_until

pytestmark = pytest.mark.integration

DELAY_MS = 50.0
SECONDS = 4.0


@pytest.fixture(scope="module")
def stack(
    pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Running, Running, dict[str, str]]]:
    set_host_addresses(["127.0.0.1"])
    tag = uuid.uuid4().hex[:8]
    topics = {k: f"persistent://public/default/imp-{k}-{tag}" for k in ("truth", "centroids")}
    topics["errors"] = f"persistent://public/default/imp-errors-{tag}"
    common = ["--pulsar-url", pulsar_broker.service_url]
    common += [a for k, t in topics.items() for a in (f"--pulsar-topics-{k}", t)]
    logs = tmp_path_factory.mktemp("impairment")
    with service("carom_simulator", common, free_port(), logs / "simulator.log") as sim:
        args = [*common, "--simulator-url", sim.url,
                "--webtransport-port", str(free_port(socket.SOCK_DGRAM)),
                "--limits-drain-timeout-s", "1"]  # fmt: skip
        with service("carom_router", args, free_port(), logs / "router.log", healthy=False) as r:
            yield sim, r, topics


def _read(broker: Broker, topic: str, sid: str, n: int) -> list[bytes]:
    """The first ``n`` messages of session ``sid`` on ``topic`` (waiting for them)."""
    client = pulsar.Client(broker.service_url, logger=quiet_logger())
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    out: list[bytes] = []
    try:

        def enough() -> bool:
            while reader.has_message_available():
                msg = reader.read_next(10_000)
                if msg.partition_key() == sid:
                    out.append(msg.data())
            return len(out) >= n

        wait_until(enough, lambda: f"{n} messages of {sid} (have {len(out)})", timeout=30)
    finally:
        client.close()
    return out


def _medians(reports: list[schemas.Centroid], rendered: dict[int, int]) -> dict[str, float]:
    """The two hops' medians over ``reports`` (each of a frame in ``rendered``: rtp_ts ->
    t_render_ns): the reports path on the server clock (the client's clock estimate is right
    when the delay is the same both ways), and the media path, render -> the client has it."""
    return {
        "analysed_to_router_ms": statistics.median(
            (c.t_router_recv_ns - c.t_browser_analysed_ns) / 1e6
            for c in reports
            if c.t_browser_analysed_ns is not None
        ),
        "render_to_received_ms": statistics.median(
            (c.t_browser_recv_ns - rendered[c.rtp_ts]) / 1e6
            for c in reports
            if c.t_browser_recv_ns is not None
        ),
    }


def test_each_path_of_the_session_that_asked_is_delayed_and_no_other(
    pulsar_broker: Broker, stack: tuple[Running, Running, dict[str, str]]
) -> None:
    _, router, topics = stack
    both = NetPath(delay_ms=DELAY_MS)
    network = Profile(name="test", media=both, reports=both, results=both)
    tag = uuid.uuid4().hex[:6]
    sids = {"clear": f"imp-clear-{tag}", "delayed": f"imp-delay-{tag}"}

    async def run() -> dict[str, CaromSession]:
        info = await RouterInfo.fetch(router.url)
        sessions = {
            "clear": CaromSession(info, sids["clear"], SessionParams(fps=30)),
            "delayed": CaromSession(info, sids["delayed"], SessionParams(fps=30, network=network)),
        }
        await asyncio.gather(*(s.open() for s in sessions.values()))
        await asyncio.sleep(SECONDS)  # kept: what these seconds produced is what is checked
        await asyncio.gather(*(s.close() for s in sessions.values()))
        return sessions

    sessions = asyncio.run(run())
    hops: dict[str, dict[str, float]] = {}
    for kind, s in sessions.items():
        assert s.reports_sent >= 30 * SECONDS * 0.5, (kind, s.reports_sent)
        answer = s.core.answer  # the parameters in force, as the simulator answered them
        assert answer is not None
        assert answer.params.impairment.name == ("test" if kind == "delayed" else "clear")
        sid = sids[kind]
        reports = [
            schemas.decode(d, schemas.Centroid)
            for d in _read(pulsar_broker, topics["centroids"], sid, s.reports_sent)
        ]
        truths = (
            schemas.decode_truth_topic(d)
            for d in _read(pulsar_broker, topics["truth"], sid, s.frames)
        )
        rendered = {t.rtp_ts: t.t_render_ns for t in truths if isinstance(t, schemas.Truth)}
        hops[kind] = _medians([c for c in reports if c.rtp_ts in rendered], rendered)
    print(f"\nmedians: {hops}")
    added = hops["delayed"]["render_to_received_ms"] - hops["clear"]["render_to_received_ms"]
    assert DELAY_MS * 0.8 < added < DELAY_MS * 2, hops
    assert hops["clear"]["analysed_to_router_ms"] < DELAY_MS * 0.2, hops
    assert DELAY_MS * 0.8 < hops["delayed"]["analysed_to_router_ms"] < DELAY_MS * 1.6, hops
    # The router counted what its emulation did (at the session's end).
    counters = scrape(router.url).by("carom_router_events_total", "event")
    assert counters.get("sessions_impaired") == 1, counters
    assert counters.get("impaired_reports_packets", 0) > 30 * SECONDS * 0.5, counters


def test_a_bad_profile_is_refused_with_its_field_named() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.network\.media\.loss_pct"):
        msgspec.json.decode(b'{"network": {"media": {"loss_pct": 150}}}', type=SessionParams)
    with pytest.raises(msgspec.ValidationError, match="no profile 'dialup'; known: clear, lte"):
        msgspec.json.decode(b'{"network": "dialup"}', type=SessionParams)
    assert SessionParams(network="satellite").impairment.media.delay_ms == 270


def test_a_live_change_of_network_delays_each_path_from_its_phase_on(
    pulsar_broker: Broker, stack: tuple[Running, Running, dict[str, str]]
) -> None:
    """Clear for a while, then ``control(network=...)``: frames of the new phase arrive later by
    the media path's delay, reports reach the router later by the reports path's, and the
    session's recorded phases name the network each was on."""
    sim, router, topics = stack
    media, both = NetPath(delay_ms=2 * DELAY_MS), NetPath(delay_ms=DELAY_MS)
    network = Profile(name="live", media=media, reports=both, results=both)
    sid = f"imp-live-{uuid.uuid4().hex[:6]}"
    before = scrape(router.url).by("carom_router_events_total", "event").get("network_changes", 0)

    async def run() -> tuple[CaromSession, object]:
        info = await RouterInfo.fetch(router.url)
        s = CaromSession(info, sid, SessionParams(fps=30))
        await s.open()
        await asyncio.sleep(SECONDS / 2)  # kept: the clear phase
        ack = await s.control(network=network)
        await asyncio.sleep(SECONDS / 2)  # kept: the delayed phase
        await s.close()
        return s, ack

    s, ack = asyncio.run(run())
    assert getattr(ack, "ok", False), ack
    assert ack.phase == 1 and ack.params.impairment.name == "live", ack  # type: ignore[attr-defined]
    truths = [
        schemas.decode_truth_topic(d) for d in _read(pulsar_broker, topics["truth"], sid, s.frames)
    ]
    rendered = {t.rtp_ts: t for t in truths if isinstance(t, schemas.Truth)}
    reports = [
        schemas.decode(d, schemas.Centroid)
        for d in _read(pulsar_broker, topics["centroids"], sid, s.reports_sent)
    ]
    hops: dict[int, dict[str, float]] = {}
    for phase in (0, 1):
        mine = [c for c in reports if c.rtp_ts in rendered and rendered[c.rtp_ts].phase == phase]
        assert len(mine) >= 30 * SECONDS / 2 * 0.4, (phase, len(mine))
        # Skip the first half second of the delayed phase: the frames then were on the wire
        # when it changed (they arrive as the old network said).
        settled = mine[15:] if phase == 1 else mine
        hops[phase] = _medians(settled, {ts: t.t_render_ns for ts, t in rendered.items()})
    print(f"\nmedians by phase: {hops}")
    added = hops[1]["render_to_received_ms"] - hops[0]["render_to_received_ms"]
    assert 2 * DELAY_MS * 0.8 < added < 2 * DELAY_MS * 2, hops
    assert hops[0]["analysed_to_router_ms"] < DELAY_MS * 0.2, hops
    assert DELAY_MS * 0.8 < hops[1]["analysed_to_router_ms"] < DELAY_MS * 1.6, hops
    # Its end records each phase's network (the tracker's report shows it per phase).
    end = next(t for t in truths if isinstance(t, schemas.SessionEnd))
    assert [(ph.phase, ph.network) for ph in end.phases] == [(0, "clear"), (1, "live")], end
    after = scrape(router.url).by("carom_router_events_total", "event")
    assert after.get("network_changes", 0) == before + 1, after
    sim_events = scrape(sim.url).by("carom_simulator_sessions_events_total", "event")
    assert sim_events.get("network_changes"), sim_events
