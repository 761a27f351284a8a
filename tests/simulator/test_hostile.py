"""The simulator under hostile or broken clients (issue 14), as it runs: a subprocess, the real
broker, real aiortc peers, raw sockets for what a polite HTTP client would never send.

- Bodies: 10 MB ones, with and without a Content-Length, and bodies trickled byte by byte, are
  refused while they are read; the simulator's RSS comes back to its baseline.
- Offers that never connect: 100 at once hold no slot past the connect timeout, and a session
  that was streaming before keeps streaming.
- The token: without it, or with a wrong one, the session API answers 401 and nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from carom_client.video import DecodedFrame, VideoClient
from carom_local.pulsar import Broker
from carom_runtime.ice import set_host_addresses
from tests.services import (
    SIMULATOR_AUTH,
    SIMULATOR_TOKEN,
    TOKEN_ENV,
    Running,
    free_port,
    metric,
    service,
    wait_until,
    wait_until_async,
)
from tests.simulator.direct import open_direct

pytestmark = pytest.mark.integration

#: The simulator's settings under test: its defaults, but a short body timeout (to keep the test
#: short; the default is 10 s) and a truth topic of its own.
MAX_SESSIONS = 16
CONNECT_TIMEOUT_S = 5.0  # the default, measured as shipped
BODY_TIMEOUT_S = 2.0
MAX_BODY = 128_000
MB10 = 10_000_000


@pytest.fixture(scope="module")
def sim(pulsar_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    set_host_addresses(["127.0.0.1"])
    topic = f"persistent://public/default/test-hostile-{uuid.uuid4().hex[:8]}"
    args = ["--pulsar-url", pulsar_broker.service_url, "--pulsar-topics-truth", topic,
            "--body-timeout-s", str(BODY_TIMEOUT_S)]  # fmt: skip
    log = tmp_path_factory.mktemp("hostile") / "simulator.log"
    with service("carom_simulator", args, free_port(), log) as running:
        yield running


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS in /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def rejected(url: str, reason: str) -> float:
    """Requests refused for ``reason`` so far (0 before the first)."""
    return metric(url, "carom_simulator_requests_rejected_total", 0.0, reason=reason)


def session_event(url: str, event: str) -> float:
    """Session events ``event`` so far (0 before the first)."""
    return metric(url, "carom_simulator_sessions_events_total", 0.0, event=event)


def truth_acked(url: str) -> float:
    return metric(url, "carom_simulator_truth_messages_total", 0.0, outcome="acked")


def sessions(url: str) -> list[dict[str, object]]:
    r = httpx.get(f"{url}/sessions", headers=SIMULATOR_AUTH, timeout=5)
    assert r.status_code == 200, r.text
    listed: list[dict[str, object]] = r.json()
    return listed


# --- raw HTTP, for bodies no polite client sends ------------------------------------------------


async def raw_request(
    url: str, head: bytes, body_parts: int, part: bytes, every_s: float, limit_s: float = 20.0
) -> int:
    """Send ``head`` then ``body_parts`` × ``part``, one every ``every_s`` s, while reading the
    answer; the status the simulator answered with (0: it closed without one)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def trickle() -> None:
        try:
            for _ in range(body_parts):
                writer.write(part)
                await writer.drain()
                if every_s:
                    await asyncio.sleep(every_s)
        except (ConnectionError, OSError):
            pass  # refused mid-body: the answer is what counts

    try:
        writer.write(head)
        sender = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(limit_s):
                status_line = await reader.readline()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    except (ConnectionError, OSError):
        return 0
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    parts = status_line.split()
    return int(parts[1]) if len(parts) >= 2 else 0


def offer_head(url: str, extra: str, token: str | None = SIMULATOR_TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    host = url.removeprefix("http://")
    return (
        f"POST /offer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"{auth}{extra}\r\n"
    ).encode()


# --- (a) bodies ----------------------------------------------------------------------------------


async def _big_bodies(url: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    limits = httpx.Limits(max_connections=10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:

        async def declared() -> int:
            r = await http.post(f"{url}/offer", content=b"x" * MB10, headers=SIMULATOR_AUTH)
            return r.status_code

        async def chunked() -> int:
            async def gen() -> object:
                for _ in range(MB10 // 65536):
                    yield b"y" * 65536

            r = await http.post(f"{url}/offer", content=gen(), headers=SIMULATOR_AUTH)  # type: ignore[arg-type]
            return r.status_code

        async def unauthenticated() -> int:
            return (await http.post(f"{url}/offer", content=b"z" * MB10)).status_code

        out["declared"] = list(await asyncio.gather(*(declared() for _ in range(20))))
        out["chunked"] = list(await asyncio.gather(*(chunked() for _ in range(20))))
        out["unauthenticated"] = list(await asyncio.gather(*(unauthenticated() for _ in range(5))))
    # A lying sender: says chunked, then streams 10 MB in 16 kB pieces on a raw socket.
    head = offer_head(url, "Transfer-Encoding: chunked\r\n")
    chunk = b"4000\r\n" + b"w" * 0x4000 + b"\r\n"
    out["raw_chunked"] = [await raw_request(url, head, MB10 // 0x4000, chunk, 0.0)]
    return out


async def _slow_bodies(url: str, n: int) -> list[int]:
    """``n`` bodies at once, each announced as 100 kB and sent 100 bytes every 0.2 s."""
    head = offer_head(url, "Content-Length: 100000\r\n")
    return list(
        await asyncio.gather(*(raw_request(url, head, 1000, b"s" * 100, 0.2) for _ in range(n)))
    )


def test_big_and_slow_bodies_are_refused_and_memory_comes_back(sim: Running) -> None:
    # Warm up the paths a refusal takes, so the baseline is the steady state, not a cold start.
    for _ in range(3):
        httpx.post(f"{sim.url}/offer", content=b"{}", headers=SIMULATOR_AUTH)
        httpx.get(f"{sim.url}/sessions", headers=SIMULATOR_AUTH)
        httpx.get(f"{sim.url}/metrics")
    time.sleep(0.5)  # kept: the warm-up settles before the baseline (a measurement, no condition)
    baseline = rss_mb(sim.proc.pid)
    reasons = ("oversize", "body_timeout", "busy", "token_missing")
    before = {r: rejected(sim.url, r) for r in reasons}

    t0 = time.monotonic()
    big = asyncio.run(_big_bodies(sim.url))
    big_s = time.monotonic() - t0
    first = rss_mb(sim.proc.pid)
    # The same three times more: nothing of it may stay. One body kept per attack would add
    # 10 MB each time (30 MB over three); the allocator's own drift is a few MB (4 MB seen).
    for _ in range(3):
        again = asyncio.run(_big_bodies(sim.url))
        assert again == big
    second = rss_mb(sim.proc.pid)
    assert big["declared"] == [413] * 20, big
    assert big["chunked"] == [413] * 20, big
    assert big["raw_chunked"] == [413], big
    assert big["unauthenticated"] == [401] * 5, big  # refused on its headers: body never read

    # More trickled bodies than slots to read them in: the first 16 wait for the body timeout
    # (408), the rest are refused at once (503), so at most 16 buffers are ever held.
    t1 = time.monotonic()
    slow = asyncio.run(_slow_bodies(sim.url, MAX_SESSIONS + 4))
    slow_s = time.monotonic() - t1
    assert sorted(slow) == [408] * MAX_SESSIONS + [503] * 4, slow
    assert slow_s < BODY_TIMEOUT_S + 3, slow_s

    counted = {r: rejected(sim.url, r) - n for r, n in before.items()}
    assert counted == {
        "oversize": 164,
        "body_timeout": MAX_SESSIONS,
        "busy": 4,
        "token_missing": 20,
    }

    # Back within 10% of the baseline (a moment for the allocator to hand memory back).
    after = rss_mb(sim.proc.pid)
    deadline = time.monotonic() + 15
    while after > baseline * 1.10 and time.monotonic() < deadline:
        time.sleep(0.5)
        after = rss_mb(sim.proc.pid)
    print(
        f"\nRSS baseline {baseline:.1f} MB, after 41 x 10 MB bodies {first:.1f} MB (refused in "
        f"{big_s:.1f} s), after 3 x 41 more {second:.1f} MB, after {len(slow)} slow bodies (in "
        f"{slow_s:.1f} s) {after:.1f} MB ({after / baseline - 1:+.1%})"
    )
    assert after <= baseline * 1.10, (baseline, after)
    assert second < first + MB10 / 1e6, (first, second)  # less than one body over 3 attacks
    assert httpx.get(f"{sim.url}/health").status_code == 200


def test_bad_content_length_is_a_clear_400(sim: Running) -> None:
    status = asyncio.run(
        raw_request(sim.url, offer_head(sim.url, "Content-Length: 12abc\r\n"), 0, b"", 0.0)
    )
    assert status == 400


# --- (b) offers that never connect --------------------------------------------------------------


@dataclass
class Flood:
    """What 100 offers that never connect did, seen from a session that was streaming."""

    statuses: list[int]
    accepted: int
    #: From the first offer sent to the last one answered.
    answer_s: float
    #: From the last offer answered to every ghost's slot free (None: not within the wait).
    release_s: float | None
    #: The healthy session's frames, and the largest gap between two, from the attack on.
    window_s: float
    frames: int
    max_gap_s: float
    stats: dict[str, float]
    #: Frames of a session opened in a slot a ghost held.
    again: int


async def _flood_while_watching(url: str) -> Flood:
    frames: list[DecodedFrame] = []
    healthy, _ = await open_direct(url, "healthy", frames.append, {"fps": 30})
    ghost = VideoClient(lambda f: None)  # makes a real offer, then never answers anything
    try:
        await wait_until_async(
            lambda: len(frames) >= 15, "15 frames at the healthy session (it never started)", 10
        )
        sdp = await ghost.offer()
        frames_before = len(frames)
        t_attack = time.monotonic()
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=SIMULATOR_AUTH) as http:

            async def one(i: int) -> tuple[int, float]:
                r = await http.post(f"{url}/offer", json={"session_id": f"ghost-{i}", "sdp": sdp})
                return r.status_code, time.monotonic()

            answers = await asyncio.gather(*(one(i) for i in range(100)))
            accepted = [t for status, t in answers if status == 200]
            last_accepted = max(accepted) if accepted else t_attack
            # Every ghost's slot comes free; the healthy session stays.
            released = None
            while time.monotonic() < last_accepted + CONNECT_TIMEOUT_S + 10:
                live = (await http.get(f"{url}/sessions")).json()
                if [s["session_id"] for s in live] == ["healthy"]:
                    released = time.monotonic()
                    break
                await asyncio.sleep(0.1)
            # Kept: the healthy session's frames are counted over a window that runs on 1 s
            # after the ghosts are gone (it keeps streaming); its rate is checked over the window.
            await asyncio.sleep(1.0)
            t_end = time.monotonic()
            frames_end = len(frames)
            live = (await http.get(f"{url}/sessions")).json()
            stats = next(s for s in live if s["session_id"] == "healthy")["stats"]
            # A slot freed is a slot usable: a new session gets in, with frames.
            again: list[DecodedFrame] = []
            second, _ = await open_direct(url, "after", again.append, {"fps": 30})
            try:
                await wait_until_async(
                    lambda: len(again) >= 5, "5 frames at a session in a freed slot", timeout=10
                )
            finally:
                await second.close()
                await http.delete(f"{url}/sessions/after")
                await http.delete(f"{url}/sessions/healthy")
        watched = frames[frames_before:frames_end]
        gaps = [(b.t_recv_ns - a.t_recv_ns) / 1e9 for a, b in itertools.pairwise(watched)]
        return Flood(
            statuses=sorted(status for status, _ in answers),
            accepted=len(accepted),
            answer_s=last_accepted - t_attack,
            release_s=None if released is None else released - last_accepted,
            window_s=t_end - t_attack,
            frames=len(watched),
            max_gap_s=max(gaps, default=float("inf")),
            stats=stats,
            again=len(again),
        )
    finally:
        await ghost.close()
        await healthy.close()


def test_offers_that_never_connect_free_their_slots(sim: Running) -> None:
    timeouts0 = session_event(sim.url, "connect_timeouts")
    acked0 = truth_acked(sim.url)
    r = asyncio.run(_flood_while_watching(sim.url))
    acked = truth_acked(sim.url) - acked0
    print(
        f"\n100 offers: {r.accepted} accepted in {r.answer_s:.2f} s, all freed {r.release_s} s "
        f"after the last answer (connect timeout {CONNECT_TIMEOUT_S} s); healthy session: "
        f"{r.frames} frames in {r.window_s:.1f} s, largest gap {r.max_gap_s:.3f} s, truth "
        f"acked {acked:.0f}"
    )
    assert set(r.statuses) <= {200, 503}, r.statuses
    # Every slot but the healthy session's went to a ghost; the rest were refused at once.
    assert r.accepted == MAX_SESSIONS - 1, r
    assert r.release_s is not None, f"ghost sessions still held slots: {r}"
    assert r.release_s <= CONNECT_TIMEOUT_S + 2.0, r
    assert session_event(sim.url, "connect_timeouts") - timeouts0 == MAX_SESSIONS - 1
    assert sim.proc.poll() is None
    # The healthy session streamed on through it all: no stall, truth for what it was sent. Its
    # rate is the machine's (a starved CI runner sent 82% of 30 fps here): the bound is half of it,
    # which a session the flood starved (no frame while the ghosts held their slots) cannot reach.
    assert r.frames >= 0.5 * 30 * r.window_s, r
    # A session starved while the ghosts held their slots would stall for about the connect
    # timeout (5 s); the healthy one's largest gap was 0.67 s once on a loaded CI runner.
    assert r.max_gap_s < 1.5, r
    assert r.stats["truth_emitted"] >= r.stats["frames_sent"] - 5
    assert acked >= 0.5 * 30 * r.window_s
    assert r.again >= 5
    assert sessions(sim.url) == []


def test_an_offer_whose_client_left_frees_its_slot_at_once(sim: Running) -> None:
    """The router cancels a relay it gave up on: the offer's HTTP client is gone before the
    answer. The session is closed as soon as its answer is made, not after the connect timeout."""

    async def leave_early() -> None:
        ghost = VideoClient(lambda f: None)
        try:
            body = httpx.Request(
                "POST", "http://x/", json={"session_id": "left", "sdp": await ghost.offer()}
            ).content
            host, port = sim.url.removeprefix("http://").split(":")
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(offer_head(sim.url, f"Content-Length: {len(body)}\r\n") + body)
            await writer.drain()
            writer.close()  # gone before any answer
            await writer.wait_closed()
        finally:
            await ghost.close()

    left0 = session_event(sim.url, "abandoned") + rejected(sim.url, "client_gone")
    t0 = time.monotonic()
    asyncio.run(leave_early())
    wait_until(
        lambda: session_event(sim.url, "abandoned") + rejected(sim.url, "client_gone") > left0,
        "the abandoned offer's session closed (or its request refused) within 2 s",
        timeout=max(0.0, t0 + 2.0 - time.monotonic()),
        every=0.05,
    )
    freed_s = time.monotonic() - t0
    assert sessions(sim.url) == []
    assert freed_s < 2.0, freed_s  # well inside the connect timeout


# --- (c) the token -------------------------------------------------------------------------------


def test_the_session_api_answers_the_router_only(sim: Running) -> None:
    async def watch_and_attack() -> dict[str, object]:
        frames: list[DecodedFrame] = []
        client, _ = await open_direct(sim.url, "victim", frames.append, {"fps": 30})
        out: dict[str, object] = {}
        try:
            await wait_until_async(lambda: len(frames) >= 10, "10 frames at the victim", 10)
            wrong = {"Authorization": "Bearer " + "x" * len(SIMULATOR_TOKEN)}
            async with httpx.AsyncClient(timeout=10) as http:
                for name, headers in (
                    ("none", {}),
                    ("wrong", wrong),
                    ("basic", {"Authorization": f"Basic {SIMULATOR_TOKEN}"}),
                    ("in a cookie", {"Cookie": f"token={SIMULATOR_TOKEN}"}),
                ):
                    out[name] = [
                        await http.get(f"{sim.url}/sessions", headers=headers),
                        await http.delete(f"{sim.url}/sessions/victim", headers=headers),
                        await http.post(
                            f"{sim.url}/offer",
                            json={"session_id": "intruder", "sdp": "v=0"},
                            headers=headers,
                        ),
                        await http.get(f"{sim.url}/openapi.json", headers=headers),
                    ]
                n = len(frames)
                # The victim's video never stopped: 20 frames within 1 s.
                await wait_until_async(
                    lambda: len(frames) - n >= 20,
                    lambda: f"20 frames at the victim within the second (got {len(frames) - n})",
                    timeout=1.0,
                    every=0.05,
                )
                out["frames_after"] = len(frames) - n
                out["open"] = [
                    (await http.get(f"{sim.url}/health")).status_code,
                    (await http.get(f"{sim.url}/metrics")).status_code,
                ]
                listed = await http.get(f"{sim.url}/sessions", headers=SIMULATOR_AUTH)
                out["listed"] = [s["session_id"] for s in listed.json()]
                gone = await http.delete(f"{sim.url}/sessions/victim", headers=SIMULATOR_AUTH)
                out["deleted"] = gone.status_code
        finally:
            await client.close()
        return out

    missing0, wrong0 = rejected(sim.url, "token_missing"), rejected(sim.url, "token_wrong")
    out = asyncio.run(watch_and_attack())
    for name in ("none", "wrong", "basic", "in a cookie"):
        responses = out[name]
        assert isinstance(responses, list)
        for r in responses:
            assert r.status_code == 401, (name, r.request.method, r.request.url, r.text)
            assert r.headers["content-type"] == "application/json"
            assert r.headers["www-authenticate"].startswith("Bearer")
            detail = r.json()["detail"]
            assert "access token" in detail and SIMULATOR_TOKEN not in detail
    assert "wrong access token" in out["wrong"][0].json()["detail"]  # type: ignore[index]
    assert rejected(sim.url, "token_missing") - missing0 == 12
    assert rejected(sim.url, "token_wrong") - wrong0 == 4
    assert out["frames_after"] >= 20  # type: ignore[operator]
    assert out["open"] == [200, 200]
    assert out["listed"] == ["victim"]
    assert out["deleted"] == 204
    assert sessions(sim.url) == []


def test_no_token_means_no_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAROM_SIMULATOR")}
    p = subprocess.run(
        [sys.executable, "-m", "carom_simulator", "--http-port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2, p.stderr
    assert "no access token" in p.stderr and TOKEN_ENV["carom_simulator"] in p.stderr
    assert "allow_no_token" in p.stderr
    assert "Traceback" not in p.stderr


def test_allow_no_token_opens_the_api_on_purpose(pulsar_broker: Broker, tmp_path: Path) -> None:
    env = {TOKEN_ENV["carom_simulator"]: "", "CAROM_SIMULATOR__ACCESS__ALLOW_NO_TOKEN": "true"}
    args = ["--pulsar-url", pulsar_broker.service_url]
    with service("carom_simulator", args, free_port(), tmp_path / "open.log", env=env) as open_sim:
        assert open_sim.headers == {}
        assert httpx.get(f"{open_sim.url}/sessions").json() == []
        assert "session API OPEN" in open_sim.text()
