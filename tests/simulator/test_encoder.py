"""The tuned H.264 encoder: aiortc's encoder with our libx264 preset and thread count."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import aiortc.rtcrtpsender
import av
import numpy as np
import pytest
from aiortc import RTCRtpCodecParameters

from carom_client.centroid import centroid_i420
from carom_simulator import encoder
from carom_simulator.render import Renderer


def sender_encoder(codec: RTCRtpCodecParameters) -> Any:
    """The encoder aiortc's RTCRtpSender would create for ``codec``."""
    return aiortc.rtcrtpsender.get_encoder(codec)  # type: ignore[attr-defined]


H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)


@pytest.fixture
def installed() -> Iterator[None]:
    encoder.install("ultrafast", 1)
    yield
    encoder.uninstall()


def _frames(n: int) -> list[av.VideoFrame]:
    r = Renderer(640, 480, 20.0)
    out = []
    for i in range(n):
        f = av.VideoFrame.from_ndarray(r.render_i420(100.0 + 3.3 * i, 240.5), format="yuv420p")
        f.pts, f.time_base = i * 3000, Fraction(1, 90000)
        out.append(f)
    return out


def test_install_swaps_only_h264(installed: None) -> None:
    enc: Any = sender_encoder(H264)
    assert isinstance(enc, encoder.TunedH264Encoder)
    assert not isinstance(sender_encoder(VP8), encoder.TunedH264Encoder)


def test_encodes_with_preset_and_keeps_timestamps_and_the_ball(installed: None) -> None:
    enc: Any = sender_encoder(H264)
    decoder = av.CodecContext.create("h264", "r")
    for i, frame in enumerate(_frames(10)):
        payloads, timestamp = enc.encode(frame)
        assert payloads and timestamp == i * 3000
        # libx264 consumed the preset (PyAV leaves only unrecognised options in the dict).
        assert "preset" not in enc.codec.options and enc.preset == "ultrafast"
        assert enc.codec.thread_count == 1 and enc.contexts == 1
    # The tuned context's bitstream, split and packetized by aiortc, decodes to the ball.
    fresh: Any = sender_encoder(H264)
    decoded: list[av.VideoFrame] = []
    for i, frame in enumerate(_frames(5)):
        nals = list(fresh._encode_frame(frame, i == 0))
        annex_b = b"".join(b"\x00\x00\x00\x01" + nal for nal in nals)
        decoded += decoder.decode(av.Packet(annex_b))
    decoded += decoder.decode(None)
    assert len(decoded) == 5
    c = centroid_i420(np.asarray(decoded[-1].to_ndarray(format="yuv420p"), np.uint8), 640, 480)
    assert c is not None and abs(c[0] - (100.0 + 3.3 * 4)) < 0.5 and abs(c[1] - 240.5) < 0.5


def test_bitrate_change_rebuilds_the_context(installed: None) -> None:
    enc: Any = sender_encoder(H264)
    frames = _frames(3)
    enc.encode(frames[0])
    first = enc.codec
    enc.target_bitrate = int(enc.target_bitrate * 0.5)
    enc.encode(frames[1])
    assert enc.codec is not first and enc.contexts == 2 and enc.codec.thread_count == 1


def test_a_pinned_bitrate_holds_against_remb_and_past_aiortcs_clamp(installed: None) -> None:
    """A session's own target (the track pins it before each frame) is what the encoder uses,
    whatever the browser's REMB sets, even below aiortc's 0.5 Mbps floor; unpinned, REMB rules."""
    enc: Any = sender_encoder(H264)
    enc.pinned_bitrate = 300_000
    enc.target_bitrate = 2_000_000  # a REMB
    assert enc.target_bitrate == 300_000
    enc.encode(_frames(1)[0])
    assert enc.codec.bit_rate == 300_000
    enc.pinned_bitrate = None
    assert enc.target_bitrate == 2_000_000
    enc.target_bitrate = 100_000  # aiortc's clamp applies to REMB
    assert enc.target_bitrate == 500_000


def test_the_sessions_frame_rate_reaches_the_rate_control(installed: None) -> None:
    """x264 spends ``target / fps`` bits a frame: told 30 at 60 fps, it sent about twice the
    target (bench/results/bitrate-60fps.json). Noise, so that the target is what limits."""
    rng = np.random.default_rng(1)
    frames = []
    for i in range(120):  # 2 s at 60 fps
        f = av.VideoFrame.from_ndarray(
            rng.integers(0, 255, (720, 640), dtype=np.uint8), format="yuv420p"
        )
        f.pts, f.time_base = i * 1500, Fraction(1, 90000)
        frames.append(f)

    def sent(fps: float | None) -> int:
        enc: Any = sender_encoder(H264)
        enc.pinned_bitrate, enc.fps = 1_000_000, fps
        return sum(len(p) for f in frames for p in enc.encode(f)[0])

    told, untold = sent(60.0), sent(None)
    assert told < 0.6 * untold, (told, untold)
    enc: Any = sender_encoder(H264)
    enc.fps = 30.0
    enc.encode(frames[0])
    first = enc.codec
    enc.fps = 60.0  # a live rate change re-creates the context at the new rate
    enc.encode(frames[1])
    assert enc.codec is not first and enc.codec.framerate == 60


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="preset"):
        encoder.install("slowest")
    with pytest.raises(ValueError, match="threads"):
        encoder.install("superfast", 99)
