"""Encoded media chunks to playable files, and files back to frames (PyAV): one place for both.

The recorder (``carom_recorder``) and the CLI (``carom-channels save``) turn a session's channel
chunks (``carom.channels``: one WebCodecs ``EncodedVideoChunk``/``EncodedAudioChunk`` each) into
a file any player opens, without decoding or re-encoding them: the chunks are muxed as they came.
``count_frames`` decodes a file back, so a recording is checked by what a player would show.

- VP8 / VP9 / AV1 go into WebM (Matroska) as they are.
- H.264 comes from WebCodecs in Annex B (start codes, SPS/PPS inline in keyframes); it goes into
  Matroska with the first keyframe's SPS and PPS as the stream's extradata, which FFmpeg's muxer
  turns into the ``avcC`` record (and each packet into length-prefixed NAL units).
- Opus goes into Ogg with an ``OpusHead`` built from the chunks' sample rate and channels (the
  page's ``AudioEncoder`` gives no description for Opus), each packet's duration read from its
  own TOC byte (RFC 6716 §3.1), which Ogg's granule positions need.

Chunks are written in the order given (the caller sorts by sequence number and drops
duplicates); timestamps that do not increase are nudged up by one tick, since a muxer refuses
them and a player would stop there.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import av

#: WebCodecs' (``carom.channels.VIDEO_CODECS``) name -> FFmpeg's decoder, and the file a
#: recording of it goes to.
VIDEO_DECODERS: Final = {"h264": "h264", "vp8": "vp8", "vp9": "vp9", "av1": "libdav1d"}
VIDEO_SUFFIX: Final = {"h264": ".mkv", "vp8": ".webm", "vp9": ".webm", "av1": ".webm"}
AUDIO_SUFFIX: Final = {"opus": ".ogg"}
_US: Final = Fraction(1, 1_000_000)
_OPUS_RATE: Final = 48_000
#: Samples an Opus decoder drops at the start (the reference encoder's lookahead at 48 kHz).
OPUS_PRE_SKIP: Final = 312


class MediaError(ValueError):
    """Chunks that cannot make a file (no keyframe, an unknown codec, nothing to write)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One encoded chunk as the channels carry it."""

    data: bytes
    timestamp_us: int
    key: bool = True
    duration_us: int | None = None


@dataclass(frozen=True, slots=True)
class Written:
    """What a write put in the file."""

    path: Path
    packets: int
    skipped: int
    "Chunks before the first keyframe (a decoder cannot start there), not written."


def _annexb_nals(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B buffer (start codes 00 00 01 or 00 00 00 01 removed)."""
    out: list[bytes] = []
    i, n, start = 0, len(data), -1
    while i + 2 < n:
        if data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 1:
            if start >= 0:
                out.append(data[start:i].rstrip(b"\x00"))
            i += 3
            start = i
        else:
            i += 1
    if start >= 0:
        out.append(data[start:])
    return [nal for nal in out if nal]


def h264_extradata(keyframe: bytes) -> bytes:
    """The SPS and PPS of an Annex B keyframe, as Annex B (what FFmpeg takes as extradata)."""
    params = [nal for nal in _annexb_nals(keyframe) if nal[0] & 0x1F in (7, 8)]
    if not any(nal[0] & 0x1F == 7 for nal in params):
        raise MediaError("the first H.264 keyframe carries no SPS (not Annex B?)")
    return b"".join(b"\x00\x00\x00\x01" + nal for nal in params)


def _dimensions(decoder: str, first_key: bytes, extradata: bytes | None) -> tuple[int, int]:
    """Width and height, from decoding the first keyframe (the meta may not say them)."""
    ctx: Any = av.CodecContext.create(decoder, "r")
    if extradata:
        ctx.extradata = extradata
    frames = [*ctx.decode(av.Packet(first_key)), *ctx.decode(None)]
    if not frames:
        raise MediaError(f"the first {decoder} keyframe does not decode")
    return int(frames[0].width), int(frames[0].height)


def _increasing(stamps: Iterable[int]) -> list[int]:
    out: list[int] = []
    for ts in stamps:
        out.append(ts if not out or ts > out[-1] else out[-1] + 1)
    return out


def write_video(chunks: Sequence[Chunk], codec: str, path: str | Path) -> Written:
    """Mux video chunks (``codec``: h264 Annex B, vp8, vp9, av1) into ``path`` unchanged.

    Chunks before the first keyframe are left out (counted in ``skipped``).
    """
    if codec not in VIDEO_DECODERS:
        raise MediaError(f"video codec {codec!r} is not one of {sorted(VIDEO_DECODERS)}")
    first = next((i for i, c in enumerate(chunks) if c.key), None)
    if first is None:
        raise MediaError(f"no keyframe among {len(chunks)} {codec} chunks")
    todo = chunks[first:]
    extradata = h264_extradata(todo[0].data) if codec == "h264" else None
    width, height = _dimensions(VIDEO_DECODERS[codec], todo[0].data, extradata)
    path = Path(path)
    with av.open(str(path), "w", format="matroska" if codec == "h264" else "webm") as out:
        stream: Any = out.add_stream(codec if codec != "av1" else "libaom-av1")
        stream.width, stream.height = width, height
        stream.time_base = _US
        if extradata is not None:
            stream.codec_context.extradata = extradata
        stamps = _increasing(c.timestamp_us for c in todo)
        base = stamps[0]
        for chunk, ts in zip(todo, stamps, strict=True):
            packet = av.Packet(chunk.data)
            packet.stream = stream
            packet.time_base = _US
            packet.pts = packet.dts = ts - base
            if chunk.duration_us:
                packet.duration = chunk.duration_us
            packet.is_keyframe = chunk.key
            out.mux(packet)
    return Written(path, len(todo), first)


def opus_head(channels: int, input_rate: int, pre_skip: int = OPUS_PRE_SKIP) -> bytes:
    """An ``OpusHead`` (RFC 7845 §5.1), mapping family 0 (mono or stereo)."""
    if not 1 <= channels <= 2:
        raise MediaError(f"{channels} Opus channels: only mono and stereo are written")
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, input_rate, 0, 0)


def opus_samples(packet: bytes) -> int:
    """Samples at 48 kHz in one Opus packet, from its TOC byte (RFC 6716 §3.1)."""
    if not packet:
        raise MediaError("empty Opus packet")
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        per_frame = (480, 960, 1920, 2880)[config % 4]
    elif config < 16:  # hybrid: 10, 20 ms
        per_frame = (480, 960)[config % 2]
    else:  # CELT: 2.5, 5, 10, 20 ms
        per_frame = (120, 240, 480, 960)[config % 4]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise MediaError("Opus packet of code 3 without its frame count")
        frames = packet[1] & 0x3F
    return per_frame * frames


def write_opus(
    chunks: Sequence[Chunk], path: str | Path, sample_rate: int = _OPUS_RATE, channels: int = 1
) -> Written:
    """Mux Opus chunks into an Ogg file at ``path`` (``sample_rate``: the encoder's input)."""
    if not chunks:
        raise MediaError("no Opus chunks")
    path = Path(path)
    with av.open(str(path), "w", format="ogg") as out:
        stream: Any = out.add_stream("libopus", rate=_OPUS_RATE)
        stream.codec_context.layout = "stereo" if channels == 2 else "mono"
        stream.time_base = Fraction(1, _OPUS_RATE)
        stream.codec_context.extradata = opus_head(channels, sample_rate)
        at = -1
        base = chunks[0].timestamp_us
        for chunk in chunks:
            samples = opus_samples(chunk.data)
            pts = max(at + 1, (chunk.timestamp_us - base) * _OPUS_RATE // 1_000_000)
            packet = av.Packet(chunk.data)
            packet.stream = stream
            packet.time_base = stream.time_base
            packet.pts = packet.dts = pts
            packet.duration = samples
            at = pts + samples - 1
            out.mux(packet)
    return Written(path, len(chunks), 0)


def count_frames(path: str | Path, kind: str = "video") -> int:
    """Frames a player decodes from ``path``'s first ``kind`` (video or audio) stream."""
    with av.open(str(path)) as container:
        streams = container.streams.video if kind == "video" else container.streams.audio
        if not streams:
            raise MediaError(f"{path} has no {kind} stream")
        return sum(1 for _ in container.decode(streams[0]))
