"""One client's WebTransport session in the router: the shell around its ``SessionCore``.

The core (``carom_router.session``) decides; a ``Link`` feeds it what aioquic delivers and carries
out what it returns: control bytes onto the stream, reports and stats to the router's publisher,
the offer and live controls to the simulator and their answers back, held results out as
aioquic's datagram queue empties. The relays speak the simulator's contract
(``carom.signaling``): an ``OfferRequest`` out and an ``Answer`` back (``POST /offer``), a
``SessionControl`` out and a ``SessionState`` back (``PATCH /sessions/{id}``), each decoded and
validated, so a malformed answer is told to the client instead of reaching the core. Both go
through the router's one HTTP client (its timeout and the simulator's token), as tasks: a slow
simulator holds up that session's answer, never the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Coroutine
from typing import Any, Protocol

import httpx
import msgspec

from carom import channels as chan
from carom import protocol as p
from carom import schemas
from carom.signaling import Answer, OfferRequest, SessionState
from carom_router import channels as chcore
from carom_router import session as core
from carom_router.channel_io import ChannelHub
from carom_router.config import RouterSettings
from carom_router.webtransport import SessionHandler, WebTransportSession

log = logging.getLogger("carom.router")

#: Results a session holds while aioquic's own datagram queue is full, sent as it empties. After
#: a broker outage the tracker delivers a backlog at once (2,529 results in about a second in
#: tests/faults); with no hold, 14-100 of them fell past aioquic's queue and never reached the
#: client. 20,000 is 5.5 minutes of 60 fps (about 1 MB); past it the newest are dropped, counted.
MAX_RESULT_BACKLOG = 20_000

_answer_decoder = msgspec.json.Decoder(Answer)
_state_decoder = msgspec.json.Decoder(SessionState)
_JSON = {"Content-Type": "application/json"}


class Hub(Protocol):
    """What a ``Link`` needs of the router that holds it (``carom_router.router.Router``).

    A protocol rather than the class, so this module depends on the router's few services, not on
    the router: no import cycle, and a link can be driven by a stand-in in a test.
    """

    @property
    def limits(self) -> core.Limits: ...
    @property
    def settings(self) -> RouterSettings: ...
    @property
    def http(self) -> httpx.AsyncClient: ...
    @property
    def counters(self) -> Counter[str]: ...
    @property
    def channels(self) -> ChannelHub: ...
    def register(self, link: Link) -> None: ...
    def forget(self, link: Link, reason: str) -> None: ...
    def publish(self, msg: schemas.Centroid | schemas.ClientStats) -> None: ...


class Link(SessionHandler):
    """One WebTransport session: feeds the core and carries out what it decides."""

    def __init__(self, router: Hub, wt: WebTransportSession, address: str) -> None:
        self.router = router
        self.wt = wt
        self.address = address
        "The client's IP address, for the per-address session limit."
        self.core = core.SessionCore(router.limits, created_ns=time.time_ns())
        self.control_stream: int | None = None
        #: The session's typed channels (``carom_router.channels``), from its hello on.
        self.channels: chcore.SessionChannels | None = None
        #: Channel streams opened before hello: ignored to their end.
        self._ignored: set[int] = set()
        self.relayed = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Encoded results waiting for room in aioquic's datagram queue, in order.
        self._held: deque[bytes] = deque()
        #: The ``end`` frame, held until ``_held`` is out (results first, then the end).
        self._held_end: bytes | None = None

    # SessionHandler -------------------------------------------------------------------------

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        # The first bidirectional stream is the control stream; every other one carries
        # channel frames (docs/channels.md), unidirectional ones as clients open them.
        if self.control_stream is None and not stream_id & 2:
            self.control_stream = stream_id
        if stream_id != self.control_stream:
            self._channel_stream(stream_id, data, end_stream)
            return
        now = time.time_ns()
        had_id = self.core.session_id
        self.act(self.core.control(data, now))
        if had_id is None and self.core.session_id is not None:
            self.router.register(self)
        if end_stream:
            self.act(self.core.control_closed())

    def datagram(self, data: bytes) -> None:
        channel = data[:2] == bytes((chan.VERSION, chan.KIND_CHANNEL))
        if channel and self.core.takes_channels:
            now = time.time_ns()
            self.channel_act(self._channels().datagram(data, now, self.core.clock))
            return
        self.act(self.core.datagram(data, time.time_ns()))

    # typed channels -------------------------------------------------------------------------

    def _channels(self) -> chcore.SessionChannels:
        if self.channels is None:
            assert self.core.session_id is not None
            self.channels = self.router.channels.open_session(self.core.session_id)
        return self.channels

    def _channel_stream(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if stream_id in self._ignored:
            if end_stream:
                self._ignored.discard(stream_id)
            return
        now = time.time_ns()
        if not self.core.takes_channels:
            if self.core.state == "closed":
                return
            if not end_stream:
                self._ignored.add(stream_id)
            self.act(self.core.bad("before_hello", "a channel stream before hello", now))
            return
        self.channel_act(self._channels().stream(stream_id, data, end_stream, now, self.core.clock))

    def channel_act(self, actions: list[chcore.ChannelAction]) -> None:
        """Carry out what the channel core decided (also called back by the hub)."""
        hub = self.router.channels
        hub.count(actions)
        for a in actions:
            if isinstance(a, chcore.PublishChannel):
                assert self.channels is not None
                self.channel_act(hub.publish(self.channels, self, a))
            elif isinstance(a, chcore.Refuse):
                self.act(self.core.refuse_channel(a.code, a.message, time.time_ns()))
            elif isinstance(a, chcore.BadStream):
                self.act(self.core.bad(a.code, a.message, time.time_ns()))
            elif isinstance(a, chcore.BadDatagram):
                self.act(self.core.refuse_channel(a.code, a.message, time.time_ns(), "invalid"))
            else:
                assert self.channels is not None
                hub.publish_end(self.channels, a)

    def channel_close(self, code: str, message: str) -> None:
        """A route's ``on_overflow: close``: the client cannot keep up with what it asked for."""
        self.act(self.core.fatal(code, message))

    def end_channels(self, reason: str) -> None:
        """The session is over: each type's ``ChannelEnd`` follows its last message."""
        if self.channels is not None:
            done = self.channels.close(reason, time.time_ns())
            self.router.channels.route_back(self.channels, None, done)
        self._ignored.clear()

    def closed(self, reason: str) -> None:
        # Results still held can no longer go anywhere: count them, as every loss is counted.
        if self._held:
            self.router.counters["errors_not_sent"] += len(self._held)
            self._held.clear()
        self.act(self.core.control_closed())
        self.router.forget(self, reason)

    # actions --------------------------------------------------------------------------------

    def act(self, actions: list[core.Action]) -> None:
        for a in actions:
            if isinstance(a, core.Publish | core.PublishStats):
                self.router.publish(a.message)
            elif isinstance(a, core.SendControl):
                if a.final and self._held:
                    self._held_end = a.data
                elif self.control_stream is not None:
                    self.wt.send_stream(self.control_stream, a.data)
            elif isinstance(a, core.RelayOffer):
                self.relayed = True
                self._spawn(self._relay(a))
            elif isinstance(a, core.RelayControl):
                self._spawn(self._relay_control(a))
            elif isinstance(a, core.StopStream):
                self._spawn(self._stop_stream(a.session_id))
            elif isinstance(a, core.Close):
                self.end_channels(a.reason)  # the core's reason, before the transport's
                self._flush(closing=True)
                self.wt.close(a.code, a.reason)
                self.router.forget(self, a.reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, offer: core.RelayOffer) -> None:
        """POST the client's offer to the simulator; its answer, or why not, goes to the core."""
        request = OfferRequest(session_id=offer.session_id, sdp=offer.sdp, params=offer.params)
        try:
            r = await self.router.http.post(
                f"{self.router.settings.simulator.url}/offer",
                content=msgspec.json.encode(request),
                headers=_JSON,
            )
        except httpx.HTTPError as exc:
            self.act(self.core.relay_failed("simulator_unavailable", f"simulator: {exc!r}"))
            return
        if r.status_code != 200:
            self.act(self.core.relay_failed(f"simulator_{r.status_code}", _detail(r)))
            return
        try:
            answer = _answer_decoder.decode(r.content)
        except msgspec.DecodeError as exc:  # ValidationError too: not the contract's Answer
            # It could not answer, as far as the client can tell (docs/protocol.md's codes).
            why = f"simulator: not a valid answer: {exc}"
            self.act(self.core.relay_failed("simulator_unavailable", why))
            return
        network = answer.params.impairment  # the parameters in force, the simulator's defaults in
        if not network.is_clear and not self.wt.is_closed:
            # The session's emulated network (carom.impairment), from before the client has the
            # answer: its reports and the results all take it.
            self.wt.impair(network.reports, network.results, seed=answer.params.seed)
            self.router.counters["sessions_impaired"] += 1
        self.act(self.core.relay_done(answer.sdp, answer.codec, answer.params, answer.warning))

    async def _relay_control(self, control: core.RelayControl) -> None:
        """PATCH the simulator's session; what is in force then, or why not, goes to the core."""
        cid = control.control_id
        url = f"{self.router.settings.simulator.url}/sessions/{control.session_id}"
        try:
            r = await self.router.http.patch(
                url, content=msgspec.json.encode(control.set), headers=_JSON
            )
        except httpx.TimeoutException:
            timeout = self.router.settings.simulator.timeout_s
            why = f"simulator unavailable: no answer within {timeout:g} s"
            self.act(self.core.control_failed(cid, "unavailable", why))
            return
        except httpx.HTTPError as exc:
            why = f"simulator unavailable: {type(exc).__name__}: {exc}"
            self.act(self.core.control_failed(cid, "unavailable", why))
            return
        if 400 <= r.status_code < 500:  # its detail names the field (422) or the session (404)
            self.act(self.core.control_failed(cid, "refused", _detail(r)))
            return
        if r.status_code != 200:
            why = f"simulator unavailable: HTTP {r.status_code}: {_detail(r)}"
            self.act(self.core.control_failed(cid, "unavailable", why))
            return
        try:
            state = _state_decoder.decode(r.content)
        except msgspec.DecodeError as exc:  # ValidationError too: not the contract's SessionState
            why = f"simulator unavailable: not a valid session state: {exc}"
            self.act(self.core.control_failed(cid, "unavailable", why))
            return
        if control.set.network is not None and not self.wt.is_closed:
            # The simulator's media path changed with it; the reports and results change here,
            # before the ack, so what the client sends once told takes the new network.
            network = state.params.impairment
            self.wt.impair(network.reports, network.results, seed=state.params.seed)
            self.router.counters["network_changes"] += 1
        self.act(self.core.control_done(cid, state))

    async def _stop_stream(self, sid: str) -> None:
        """DELETE the simulator's session: its track stops and its truth ends with SessionEnd."""
        try:
            await self.router.http.delete(f"{self.router.settings.simulator.url}/sessions/{sid}")
        except httpx.HTTPError as exc:
            log.warning("session %s: could not stop the simulator's stream: %r", sid, exc)

    def deliver(self, result: schemas.FrameResult) -> None:
        """Send one live result now, or hold it (in order) until aioquic has room for it."""
        data = p.encode_result(result)
        if not self._held and self.wt.datagram_room() > 0:
            if not self.wt.send_datagram(data):
                self.router.counters["errors_not_sent"] += 1
            return
        if self.wt.is_closed or len(self._held) >= MAX_RESULT_BACKLOG:
            self.router.counters["errors_not_sent"] += 1
            return
        self._held.append(data)
        self.router.counters["errors_held"] += 1

    def _flush(self, closing: bool = False) -> None:
        """Send held results while aioquic has room; then the held ``end``, if any.

        ``closing``: the session closes now, so the ``end`` goes out even if results are still
        held (they are counted as not sent).
        """
        for _ in range(min(len(self._held), self.wt.datagram_room())):
            if not self.wt.send_datagram(self._held.popleft()):
                self.router.counters["errors_not_sent"] += 1
        if closing and self._held:
            self.router.counters["errors_not_sent"] += len(self._held)
            self._held.clear()
        if self._held_end is not None and not self._held:
            end, self._held_end = self._held_end, None
            if self.control_stream is not None:
                self.wt.send_stream(self.control_stream, end)

    def tick(self, now_ns: int) -> None:
        if self._held or self._held_end is not None:
            self._flush()
        self.act(self.core.tick(now_ns))

    async def end(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        # Again after a StopStream too: that DELETE may have been cancelled above (404 if not).
        if self.relayed and self.core.session_id is not None:
            with contextlib.suppress(httpx.HTTPError):
                await self.router.http.delete(
                    f"{self.router.settings.simulator.url}/sessions/{self.core.session_id}"
                )


def _detail(r: httpx.Response) -> str:
    """The simulator's reason for a refusal: its ``{"detail": ...}`` (FastAPI's own 422 gives a
    list of errors there: kept as JSON), else the start of the body."""
    try:
        detail = r.json().get("detail", r.text)
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return r.text[:300]
    return detail if isinstance(detail, str) else msgspec.json.encode(detail).decode()[:300]
