"""aiortc's H.264 encoder with libx264 tuned for many sessions per core.

aiortc 1.16 creates its libx264 context with x264's default preset ("medium") and as many
threads as cores. For a ball on a plain background that buys nothing: measured here at 640x480,
"superfast" encodes a frame in 1.1 ms instead of 2.75 ms at the same size (~1.1 kB/frame), and one
thread per session avoids thread hand-offs when many sessions share two cores. Everything else
(bitrate adaptation, keyframes on PLI, packetization, ``tune=zerolatency``, Baseline profile)
stays aiortc's own.

aiortc looks its encoder up with ``aiortc.rtcrtpsender.get_encoder``; ``install`` swaps that one
name (process-wide, once at service start). ``_encode_frame`` and the reset rule it mirrors are
private to aiortc 1.16 (pinned); tests/simulator/test_encoder.py fails if they change.
"""

from __future__ import annotations

import fractions
from collections.abc import Iterator
from typing import Any

import aiortc.rtcrtpsender
import av
from aiortc.codecs import get_encoder as _aiortc_get_encoder
from aiortc.codecs.h264 import MAX_FRAME_RATE, H264Encoder

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")


class TunedH264Encoder(H264Encoder):
    preset = "superfast"
    threads = 1
    #: A session's own target bitrate (bits/s), set by its track before each frame; None: aiortc's
    #: (1 Mbps, then the browser's REMB, clamped to 0.5-3 Mbps). A pinned target holds whatever
    #: REMB says, and may lie outside aiortc's clamp.
    pinned_bitrate: int | None = None
    #: The session's frame rate, set by its track: x264's rate control spends ``target / fps``
    #: bits a frame, and aiortc tells it 30 whatever the rate (a 60 fps session sent 2x its
    #: target, bench/results/bitrate-60fps.json). None: aiortc's 30.
    fps: float | None = None

    @property
    def target_bitrate(self) -> int:
        pinned = self.pinned_bitrate
        return pinned if pinned else int(H264Encoder.target_bitrate.fget(self))  # type: ignore[attr-defined]

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        H264Encoder.target_bitrate.fset(self, bitrate)  # type: ignore[attr-defined]

    def _needs_context(self, frame: av.VideoFrame) -> bool:
        # The same rule aiortc applies: new size, or a bitrate change of over 10%.
        codec = self.codec
        return codec is None or (
            frame.width != codec.width
            or frame.height != codec.height
            or abs(self.target_bitrate - (codec.bit_rate or 0)) / (codec.bit_rate or 1) > 0.1
            or self._rate() != codec.framerate
        )

    def _rate(self) -> fractions.Fraction:
        fps = self.fps
        return fractions.Fraction(MAX_FRAME_RATE if fps is None else fps).limit_denominator(1001)

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        if self._needs_context(frame):
            self.buffer_data = b""
            self.buffer_pts = None
            codec = av.CodecContext.create("libx264", "w")
            codec.width = frame.width
            codec.height = frame.height
            codec.bit_rate = self.target_bitrate
            codec.pix_fmt = "yuv420p"
            codec.framerate = self._rate()
            codec.time_base = 1 / self._rate()
            codec.options = {"level": "31", "tune": "zerolatency", "preset": self.preset}
            codec.profile = "Baseline"
            codec.thread_count = self.threads
            self.codec = codec
            self.contexts = getattr(self, "contexts", 0) + 1
        return super()._encode_frame(frame, force_keyframe)


def install(preset: str = "superfast", threads: int = 1) -> None:
    """Make every aiortc sender in this process encode H.264 with ``preset`` and ``threads``."""
    if preset not in PRESETS:
        raise ValueError(f"encoder preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if not 0 <= threads <= 16:
        raise ValueError(f"encoder threads must be within 0..16 (0 = auto), got {threads}")

    class Configured(TunedH264Encoder):
        pass

    Configured.preset, Configured.threads = preset, threads

    def get_encoder(codec: Any) -> Any:
        if codec.mimeType.lower() == "video/h264":
            return Configured()
        return _aiortc_get_encoder(codec)

    setattr(aiortc.rtcrtpsender, "get_encoder", get_encoder)  # noqa: B010 - not re-exported


def uninstall() -> None:
    setattr(aiortc.rtcrtpsender, "get_encoder", _aiortc_get_encoder)  # noqa: B010
