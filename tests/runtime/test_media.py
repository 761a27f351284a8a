"""carom_runtime.media against real codecs: chunks encoded by PyAV's libvpx, libx264 and libopus
(as WebCodecs would hand them over), muxed unchanged, and the file decoded back."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from carom_runtime import media

FPS = 30


def _video(codec: str, n: int, options: dict[str, str], size: tuple[int, int]) -> list[media.Chunk]:
    ctx: Any = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = size
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, FPS)
    ctx.framerate = FPS
    ctx.options = options
    out: list[media.Chunk] = []

    def take(packets: Any) -> None:
        for p in packets:
            ts = int(p.pts) * 1_000_000 // FPS
            out.append(media.Chunk(bytes(p), ts, bool(p.is_keyframe)))

    rng = np.random.default_rng(7)
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        img[:, : (i * 7) % size[0]] = rng.integers(0, 255, 3, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        take(ctx.encode(frame))
    take(ctx.encode(None))
    return out


def vp8_chunks(n: int = 30, size: tuple[int, int] = (160, 120)) -> list[media.Chunk]:
    """VP8 chunks as a page's VideoEncoder gives them (keyframe every 10)."""
    return _video("libvpx", n, {"deadline": "realtime", "g": "10"}, size)


def h264_chunks(n: int = 30, size: tuple[int, int] = (160, 120)) -> list[media.Chunk]:
    """H.264 Annex B chunks, SPS/PPS in each keyframe, no B-frames (WebCodecs' realtime)."""
    params = "keyint=10:min-keyint=10:annexb=1:repeat-headers=1"
    opts = {"preset": "ultrafast", "tune": "zerolatency", "x264-params": params, "bf": "0"}
    return _video("libx264", n, opts, size)


def opus_chunks(n: int = 50, channels: int = 1) -> list[media.Chunk]:
    """Opus packets of 20 ms at 48 kHz (an AudioEncoder's default frame)."""
    ctx: Any = av.CodecContext.create("libopus", "w")
    ctx.sample_rate = 48_000
    ctx.layout = "stereo" if channels == 2 else "mono"
    ctx.format = "s16"
    ctx.time_base = Fraction(1, 48_000)
    out: list[media.Chunk] = []
    t = np.arange(960)
    for i in range(n):
        tone = (np.sin((t + i * 960) / 10) * 8000).astype(np.int16)
        data = np.repeat(tone[None, :], channels, axis=0).T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=ctx.layout.name)
        frame.sample_rate = 48_000
        frame.pts = i * 960
        packets: Any = [*ctx.encode(frame)]
        out += [media.Chunk(bytes(p), int(p.pts) * 1_000_000 // 48_000) for p in packets]
    packets = [*ctx.encode(None)]
    out += [media.Chunk(bytes(p), int(p.pts) * 1_000_000 // 48_000) for p in packets]
    return out


@pytest.mark.parametrize(("codec", "make"), [("vp8", vp8_chunks), ("h264", h264_chunks)])
def test_video_chunks_make_a_file_that_decodes_every_one(
    tmp_path: Path, codec: str, make: object
) -> None:
    assert callable(make)
    chunks = make(24)
    assert len(chunks) == 24 and chunks[0].key and sum(c.key for c in chunks) >= 2
    path = tmp_path / f"v{media.VIDEO_SUFFIX[codec]}"
    written = media.write_video(chunks, codec, path)
    assert (written.packets, written.skipped) == (24, 0)
    assert media.count_frames(path) == 24
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (160, 120)
        assert stream.codec_context.name == codec


def test_h264_keyframes_are_annex_b_and_their_sps_pps_become_extradata() -> None:
    chunks = h264_chunks(3)
    assert chunks[0].data.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))
    extradata = media.h264_extradata(chunks[0].data)
    nal_types = [n[0] & 0x1F for n in extradata.split(b"\x00\x00\x00\x01") if n]
    assert nal_types == [7, 8]
    with pytest.raises(media.MediaError, match="SPS"):
        media.h264_extradata(b"\x00\x00\x00\x01\x65\x88")  # an IDR slice alone


def test_chunks_before_the_first_keyframe_are_left_out(tmp_path: Path) -> None:
    chunks = vp8_chunks(20)  # keyframes at 0 and 10
    assert chunks[10].key and not any(c.key for c in chunks[1:10])
    written = media.write_video(chunks[3:], "vp8", tmp_path / "v.webm")
    assert (written.packets, written.skipped) == (10, 7)
    assert media.count_frames(tmp_path / "v.webm") == 10


def test_no_keyframe_or_unknown_codec_is_refused(tmp_path: Path) -> None:
    chunks = vp8_chunks(5)
    with pytest.raises(media.MediaError, match="no keyframe"):
        media.write_video(chunks[1:], "vp8", tmp_path / "v.webm")
    with pytest.raises(media.MediaError, match="not one of"):
        media.write_video(chunks, "theora", tmp_path / "v.webm")


def test_repeated_timestamps_are_nudged_not_refused(tmp_path: Path) -> None:
    chunks = [media.Chunk(c.data, 0, c.key) for c in vp8_chunks(12)]
    media.write_video(chunks, "vp8", tmp_path / "v.webm")
    assert media.count_frames(tmp_path / "v.webm") == 12


@pytest.mark.parametrize("channels", [1, 2])
def test_opus_chunks_make_an_ogg_file_that_decodes_every_one(tmp_path: Path, channels: int) -> None:
    chunks = opus_chunks(40, channels)
    assert len(chunks) >= 40
    path = tmp_path / "a.ogg"
    written = media.write_opus(chunks, path, 48_000, channels)
    assert written.packets == len(chunks)
    assert media.count_frames(path, "audio") == len(chunks)
    with av.open(str(path)) as c:
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "opus" and audio.codec_context.channels == channels
        assert c.streams.video == ()  # no video stream: count_frames says so
    with pytest.raises(media.MediaError, match="no video stream"):
        media.count_frames(path, "video")


def test_opus_head_and_packet_durations() -> None:
    head = media.opus_head(2, 44_100)
    assert head[:8] == b"OpusHead" and len(head) == 19 and head[9] == 2
    assert int.from_bytes(head[12:16], "little") == 44_100
    # TOC: config 31 (CELT 20 ms), code 0 -> 960; config 1 (SILK 20 ms), code 1 -> 2 x 960;
    # config 16 (CELT 2.5 ms), code 3 with 6 frames -> 720.
    assert media.opus_samples(bytes([31 << 3])) == 960
    assert media.opus_samples(bytes([(1 << 3) | 1])) == 1920
    assert media.opus_samples(bytes([(16 << 3) | 3, 6])) == 720
    assert {media.opus_samples(c.data) for c in opus_chunks(3)} == {960}
    with pytest.raises(media.MediaError):
        media.opus_head(3, 48_000)
