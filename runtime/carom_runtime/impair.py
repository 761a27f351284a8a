"""The emulated network's shell: packets held on the event loop until ``carom.impairment`` says.

``carom.impairment.Link`` decides each packet's fate (lost, or its arrival time) with no clock
and no I/O; a ``DelayLine`` asks it for every packet handed in, keeps the ones it sends in a
bounded heap and hands each on at its time, in the order of those times (ties in the order they
came). One timer is armed at a time, for the earliest packet, so a busy line costs a heap push and
pop per packet and never a task.

Where the packets go is the caller's ``deliver``: a socket's ``sendto`` for packets leaving (the
router's datagrams to a client), the protocol's own ``datagram_received`` for packets arriving
(a client's datagrams to the router). ``deliver`` runs on the loop, as the I/O it replaces would.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar

from carom.impairment import Counts, Link, Path

T = TypeVar("T")

#: Packets a line holds at most; past it a packet is dropped and counted as ``queue_full`` (a
#: profile with a rate bounds its own queue by time; this bounds one without a rate, say a 10 s
#: delay at a high packet rate).
MAX_HELD: Final = 20_000


class DelayLine(Generic[T]):
    """One direction of one session's path: ``push`` every packet, ``deliver`` gets them later."""

    def __init__(
        self,
        link: Link,
        deliver: Callable[[T], None],
        loop: asyncio.AbstractEventLoop | None = None,
        max_held: int = MAX_HELD,
    ) -> None:
        self.link = link
        self._deliver = deliver
        self._loop = loop or asyncio.get_running_loop()
        self._max = max_held
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")
        self._closed = False

    @property
    def held(self) -> int:
        return len(self._heap)

    def push(self, item: T, size: int) -> None:
        """A packet of ``size`` bytes handed to the path now."""
        if self._closed:
            return
        now = self._loop.time()
        verdict, due = self.link.admit(now, size)
        if verdict != "sent":
            return
        if len(self._heap) >= self._max:
            self.link.counts.queue_full += 1
            return
        if due <= now and not self._heap:
            self._deliver(item)  # no delay and nothing ahead of it: no timer at all
            return
        heapq.heappush(self._heap, (due, next(self._seq), item))
        if due < self._armed_at:
            self._arm(due)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = float("inf")
        now = self._loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, item = heapq.heappop(heap)
            if self._closed:
                return
            self._deliver(item)
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        """Drop what is held (the session is gone) and disarm."""
        self._closed = True
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def is_media(packet: bytes) -> bool:
    """Whether a packet on a peer connection's ICE transport is SRTP or SRTCP (RFC 7983: a first
    byte of 128-191), which the emulated media path takes, rather than DTLS (20-63).

    The handshakes are made clear, as the router's QUIC handshake is (it impairs a session from
    its answer on): a profile measures what the network does to the stream. Over loss, DTLS's
    retransmission timers (1 s, doubling) would otherwise decide whether a session starts at all
    within the simulator's connect timeout (5 s): a Chromium page on ``wifi-congested`` (3% loss
    in bursts) did not, in the first Chromium sweep.
    """
    return bool(packet) and 128 <= packet[0] <= 191


class ImpairedIce:
    """An aiortc ICE transport's packets through two lines: what it sends, what it receives.

    aiortc's DTLS transport sends and receives through its ICE transport's ``_send`` and
    ``_recv`` (``aiortc.rtcicetransport``: bound to the aioice connection's ``send``/``recv`` at
    construction); this replaces them, so SRTP and SRTCP take the emulated network, and ICE's
    own checks and the DTLS handshake do not (``is_media``). Install it right after the
    transceiver is made, before the offer is answered, and ``close`` it with the session.
    """

    def __init__(self, ice: Any, out: Path, back: Path, seed: int | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        rng = random.Random(seed)
        self._send_raw: Callable[[bytes], Awaitable[None]] = ice._send
        self._recv_raw: Callable[[], Awaitable[bytes]] = ice._recv
        self.out: DelayLine[bytes] = DelayLine(Link(out, random.Random(rng.random())), self._sent)
        self.back: DelayLine[bytes] = DelayLine(
            Link(back, random.Random(rng.random())), self._arrived
        )
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(MAX_HELD)
        self._pump: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ice = ice
        self._hook(out, back)

    def _hook(self, out: Path, back: Path) -> None:
        # DTLS looks both up at every packet (``self.transport._send``/``_recv``), so a hook
        # made mid-session takes the next one; once made it stays (clear: straight through).
        if not out.is_clear:
            self._ice._send = self.send
        if not back.is_clear:
            self._ice._recv = self.recv

    def retarget(self, out: Path, back: Path) -> None:
        """A live change of the network: packets from now on take ``out`` and ``back``.

        What the lines hold is already on the wire and arrives as the old paths said; the
        counts go on, so a session's totals cover all its phases.
        """
        self.out.link.path = out
        self.back.link.path = back
        self._hook(out, back)

    async def send(self, data: bytes) -> None:
        if is_media(data):
            self.out.push(data, len(data))
        else:  # the DTLS handshake: clear (see ``is_media``)
            await self._send_quietly(data)

    def _sent(self, data: bytes) -> None:
        # aioice's send is a coroutine, though all it does is a socket's sendto: run it as a
        # task (it completes in its first step, so tasks keep the lines' order).
        task = self._loop.create_task(self._send_quietly(data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError):  # closed meanwhile: as if lost on the way
            await self._send_raw(data)

    async def recv(self) -> bytes:
        if self._pump is None:
            self._pump = self._loop.create_task(self._pump_in())
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _pump_in(self) -> None:
        try:
            while True:
                data = await self._recv_raw()
                if is_media(data):
                    self.back.push(data, len(data))
                else:
                    self._arrived(data)
        except ConnectionError as exc:  # the connection closed: so does what reads from us
            self._arrived(exc)

    def _arrived(self, item: bytes | BaseException) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:  # nobody reads any more (DTLS stopped): count, never grow
            self.back.link.counts.queue_full += 1

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until what was sent has left the emulated wire.

        Call it once nothing more is sent (the track stopped), before the peer connection
        closes: ``close`` drops what a line holds, and a real network would have delivered it.
        Closing at once cost a session its last frames' worth of delay (100 ms: ~3 frames at
        30 fps, missed on every session's end).
        """
        deadline = self._loop.time() + timeout_s
        while (self.out.held or self._tasks) and self._loop.time() < deadline:
            await asyncio.sleep(0.01)

    def counts(self) -> tuple[Counts, Counts]:
        """What the emulation did so far: (sent, received)."""
        return self.out.link.counts, self.back.link.counts

    def close(self) -> None:
        self.out.close()
        self.back.close()
        if self._pump is not None:
            self._pump.cancel()
