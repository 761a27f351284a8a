"""The delay line: every packet the model sends is delivered once, never early, in time order."""

from __future__ import annotations

import asyncio
import random

import pytest

from carom.impairment import Link, Path
from carom_runtime.impair import DelayLine, ImpairedIce, is_media

pytestmark = pytest.mark.asyncio


async def _through(
    path: Path, packets: int, gap_s: float, max_held: int = 20_000
) -> tuple[DelayLine[int], list[tuple[int, float]], dict[int, float]]:
    loop = asyncio.get_running_loop()
    got: list[tuple[int, float]] = []
    pushed: dict[int, float] = {}
    line: DelayLine[int] = DelayLine(
        Link(path, random.Random(5)), lambda n: got.append((n, loop.time())), max_held=max_held
    )
    for n in range(packets):
        pushed[n] = loop.time()
        line.push(n, 1200)
        await asyncio.sleep(gap_s)
    while line.held:
        await asyncio.sleep(0.01)
    return line, got, pushed


async def test_a_clear_path_delivers_at_once_without_a_timer() -> None:
    line, got, _ = await _through(Path(), 50, 0)
    assert [n for n, _ in got] == list(range(50)) and line._timer is None


async def test_a_delay_delivers_each_packet_once_never_early_in_order() -> None:
    _, got, pushed = await _through(Path(delay_ms=30), 40, 0.002)
    assert [n for n, _ in got] == list(range(40))
    assert all(t - pushed[n] >= 0.030 - 1e-3 for n, t in got)  # the loop's clock is ms-grained


async def test_lost_packets_never_come_and_the_rest_all_do() -> None:
    line, got, _ = await _through(Path(delay_ms=5, loss_pct=20), 300, 0)
    counts = line.link.counts
    assert len(got) == counts.sent == 300 - counts.lost and counts.lost > 0
    assert [n for n, _ in got] == sorted(n for n, _ in got)


async def test_reordered_packets_arrive_after_the_ones_that_overtake_them() -> None:
    line, got, _ = await _through(Path(delay_ms=5, reorder_pct=20, reorder_gap_ms=15), 200, 0.001)
    order = [n for n, _ in got]
    assert sorted(order) == list(range(200)) and order != list(range(200))
    assert line.link.counts.reordered > 0


async def test_a_full_line_drops_and_counts_and_close_drops_what_is_held() -> None:
    loop = asyncio.get_running_loop()
    got: list[int] = []
    line: DelayLine[int] = DelayLine(Link(Path(delay_ms=1000)), got.append, loop, max_held=10)
    for n in range(15):
        line.push(n, 100)
    assert line.held == 10 and line.link.counts.queue_full == 5
    line.close()
    line.push(99, 100)
    await asyncio.sleep(0.01)
    assert line.held == 0 and got == []


class _Ice:  # an aiortc ICE transport's two methods ImpairedIce replaces
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def _send(self, data: bytes) -> None:
        self.sent.append(data)

    async def _recv(self) -> bytes:
        await asyncio.sleep(3600)
        return b""


async def test_drain_lets_what_is_on_the_emulated_wire_arrive_before_the_close() -> None:
    ice = _Ice()
    net = ImpairedIce(ice, Path(delay_ms=50), Path())
    for n in range(5):
        await ice._send(bytes([0x80, n]))  # an RTP packet; replaced: into the 50 ms line
    assert ice.sent == [] and net.out.held == 5
    await net.drain(timeout_s=2.0)
    net.close()
    assert ice.sent == [bytes([0x80, n]) for n in range(5)]  # none dropped by the close


async def test_a_live_change_takes_the_next_packets_and_lets_the_held_ones_arrive() -> None:
    ice = _Ice()
    raw_send = ice._send
    net = ImpairedIce(ice, Path(), Path())
    assert ice._send == raw_send  # clear: not hooked, no cost per packet
    net.retarget(Path(delay_ms=50), Path())
    assert ice._send != raw_send  # hooked mid-session: DTLS takes it at its next packet
    await ice._send(b"\x80a")
    assert ice.sent == [] and net.out.held == 1
    net.retarget(Path(), Path())  # clear again: what is on the wire still arrives, in order
    await ice._send(b"\x80b")
    await net.drain(timeout_s=2.0)
    assert ice.sent == [b"\x80a", b"\x80b"]
    assert net.counts()[0].packets == 2  # the counts go on across the change
    net.close()


async def test_only_srtp_and_srtcp_take_the_emulated_path_and_the_dtls_handshake_is_clear() -> None:
    assert is_media(b"\x80\x60") and is_media(b"\xbf") and not is_media(b"")
    assert not is_media(b"\x16\xfe\xfd") and not is_media(b"\x00\x01")  # DTLS, STUN
    ice = _Ice()
    net = ImpairedIce(ice, Path(delay_ms=50), Path())
    await ice._send(b"\x80rtp")
    await ice._send(b"\x16dtls")  # a handshake record: sent at once, ahead of the held RTP
    assert ice.sent == [b"\x16dtls"] and net.out.held == 1
    await net.drain(timeout_s=2.0)
    assert ice.sent == [b"\x16dtls", b"\x80rtp"] and net.counts()[0].packets == 1
    net.close()
