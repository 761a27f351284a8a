"""Typed channels from Python: camera, microphone, chat, points... beside a session's reports.

The page's channel sender in Python (docs/channels.md): one unidirectional WebTransport stream
per type, opened on the type's first message, its frames (``carom.channels.encode_frame``) back
to back, the type's sequence numbers from 0. Types whose route allows datagrams may go as
datagrams instead (``datagram=True``): unreliable, one frame per datagram, so a small one.

Open channels only once the router has welcomed the session: a channel stream before hello is a
bad message, and ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from carom import channels as ch
from carom_client.webtransport import ClientSession, ClientStream


class ChannelSender:
    """Sends one session's channel messages; ``seq`` per type from 0, one stream per type."""

    def __init__(self, wt: ClientSession) -> None:
        self.wt = wt
        self._streams: dict[str, ClientStream] = {}
        self._next: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def next_seq(self, type_: str) -> int:
        return self._next[type_]

    def send(
        self,
        type_: str,
        payload: bytes = b"",
        meta: dict[str, Any] | None = None,
        t_capture_ms: float | None = None,
        *,
        datagram: bool = False,
        seq: int | None = None,
    ) -> int:
        """Send one message of ``type_``; returns its seq.

        ``t_capture_ms``: when it was captured on this machine's clock (epoch ms; default: now).
        ``seq``: a number of your own (tests: resends, gaps); default the type's next.
        ``datagram``: as one datagram (its route must allow it); False when it could not be sent
        is counted in ``counters`` (``datagrams_not_sent``) and the seq is used up all the same.
        """
        n = self._next[type_] if seq is None else seq
        self._next[type_] = max(self._next[type_], n + 1)
        when = time.time_ns() / 1e6 if t_capture_ms is None else t_capture_ms
        frame = ch.encode_frame(type_, n, when, payload, meta)
        if datagram:
            ok = self.wt.send_datagram(frame)
            self.counters["datagrams_sent" if ok else "datagrams_not_sent"] += 1
            return n
        self.stream(type_).write(frame)
        self.counters[f"sent_{type_}"] += 1
        return n

    def send_raw(self, type_: str, data: bytes) -> None:
        """Bytes as they are on ``type_``'s stream (tests: what a broken client writes)."""
        self.stream(type_).write(data)

    def stream(self, type_: str) -> ClientStream:
        """``type_``'s stream, opened on first use."""
        s = self._streams.get(type_)
        if s is None:
            s = self._streams[type_] = self.wt.open_stream(unidirectional=True)
        return s

    async def finish(self, timeout: float = 30.0) -> bool:
        """End every type's stream (FIN) and wait until QUIC says the router has all of it.

        Call it before ``bye``: streams are independent of the control stream, so a ``bye``
        written after a channel message may reach the router first, and the router takes no
        channel message once the session is closed. aioquic processes what arrives before it
        acknowledges it, so acknowledged bytes are bytes the router has read. False on timeout.
        """
        ids = [s.stream_id for s in self._streams.values()]
        for s in self._streams.values():
            s.write_eof()
        self._streams.clear()
        # aioquic's own state: the stream is gone, or its FIN is acknowledged.
        quic = self.wt._protocol._quic  # no public "all acknowledged"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            streams = quic._streams
            if all(i not in streams or streams[i].sender.is_finished for i in ids):
                return True
            await asyncio.sleep(0.01)
        return False
