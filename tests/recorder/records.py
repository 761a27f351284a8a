"""Channel records as the router publishes them, for the recorder's and the CLI's tests: real
VP8 / H.264 / Opus chunks (tests.runtime.test_media), chat text, point clouds."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from carom.channels import ChannelEnd, ChannelMessage, Format
from carom_runtime import media
from tests.runtime.test_media import opus_chunks, vp8_chunks


def record(
    session: str, type_: str, fmt: Format, seq: int, payload: bytes, meta: dict[str, object]
) -> ChannelMessage:
    now = time.time_ns()
    return ChannelMessage(
        session_id=session, type=type_, format=fmt, seq=seq, t_capture_ms=now / 1e6 - 5,
        t_capture_ns=now - 5_000_000, clock_error_ns=100_000, t_router_recv_ns=now - 1_000_000,
        t_published_ns=now, meta=meta, payload=payload,
    )  # fmt: skip


def video(session: str, chunks: Sequence[media.Chunk], type_: str = "camera", codec: str = "vp8"
          ) -> list[ChannelMessage]:  # fmt: skip
    return [
        record(
            session,
            type_,
            "video",
            i,
            c.data,
            {"codec": codec, "key": c.key, "timestamp_us": c.timestamp_us},
        )
        for i, c in enumerate(chunks)
    ]


def audio(session: str, chunks: Sequence[media.Chunk], type_: str = "microphone"
          ) -> list[ChannelMessage]:  # fmt: skip
    return [
        record(
            session,
            type_,
            "audio",
            i,
            c.data,
            {"codec": "opus", "timestamp_us": c.timestamp_us, "sample_rate": 48000, "channels": 1},
        )
        for i, c in enumerate(chunks)
    ]


def chat(session: str, texts: Sequence[str], type_: str = "chat") -> list[ChannelMessage]:
    return [record(session, type_, "text", i, t.encode(), {}) for i, t in enumerate(texts)]


def points(session: str, n: int, count: int = 1000, type_: str = "points") -> list[ChannelMessage]:
    rng = np.random.default_rng(3)
    return [
        record(
            session,
            type_,
            "points",
            i,
            rng.random((count, 3), dtype=np.float32).astype("<f4").tobytes(),
            {"count": count},
        )
        for i in range(n)
    ]


def end_of(msgs: Sequence[ChannelMessage], refused: Sequence[int] = ()) -> ChannelEnd:
    first = msgs[0]
    seqs = {m.seq for m in msgs}
    return ChannelEnd(
        session_id=first.session_id, type=first.type, accepted=len(seqs),
        last_seq=max(seqs | set(refused)), refused=len(refused), refused_seqs=list(refused),
        reason="bye", t_end_ns=time.time_ns(),
    )  # fmt: skip


__all__ = ["audio", "chat", "end_of", "opus_chunks", "points", "record", "video", "vp8_chunks"]
