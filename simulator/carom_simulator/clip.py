"""Carom's own background clips: generated, seeded and encoded here, so no media is downloaded.

A background must make the encoder work (a still or flat picture costs x264 nothing and hides
what a real scene does to the ball) and must be reproducible (a measurement over it is worth
repeating only if the pixels are the same next time). Each clip is therefore synthesised from a
seed, straight in I420 (the layout ``carom_simulator.render`` documents, BT.601 limited range),
and encoded once with libx264 into an .mp4 that ``carom_simulator.background`` decodes and loops.

Two clips, chosen for what they show about the page's detector (Cr above a threshold):

- ``texture``: busy and moving (smooth noise and a checkerboard scrolling in different directions,
  a sweeping luma gradient, chroma wandering between neutral grey, green and blue). Its Cr stays
  at or below neutral 128, so colour detection should be unaffected: what it tests is the
  encoder (bits spent on the background are bits not spent on the ball's edge).
- ``warm``: the same texture with orange, red and skin-toned blobs moving over it and a warm band
  sweeping across. Their Cr is above the detector's threshold, so this clip shows where colour
  detection fails.

Every motion is periodic with the clip's length (textures scroll by whole periods, blobs run on
closed curves), so the clip loops without a jump. Frames are produced by the pure generator
``clip_frames`` (unit-tested without any codec); ``write_clip`` is the only part doing I/O.

CLI: ``python -m carom_simulator.clip NAME OUT [--seconds S] [--fps F] [--size WxH]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import av
import numpy as np
import numpy.typing as npt

from carom_simulator.render import i420_planes, rgb_to_ycbcr601

__all__ = [
    "CLIP_NAMES",
    "GENERATOR_VERSION",
    "ClipSpec",
    "clip_frames",
    "write_clip",
]

#: The clips this module can generate.
CLIP_NAMES: Final = ("texture", "warm")
#: Part of every cached clip's file name: bump it whenever the pictures change, so a cache
#: written by an older generator is never mistaken for the current one.
GENERATOR_VERSION: Final = 1

#: Bounds on a clip: it is generated in one go (every frame passes through numpy and x264), so
#: these keep a request from turning into minutes of work or gigabytes of file.
MAX_SECONDS: Final = 60.0
MAX_FPS: Final = 120
MIN_SIDE: Final = 16
MAX_SIDE: Final = 1920

#: x264 settings. ``ultrafast`` at CRF 23: the fine noise is expensive to code, and measured here
#: (120 frames of ``texture`` at 640x480, one thread) ``veryfast``/CRF 20 took 2.6 s and 1.3 MB,
#: ``ultrafast``/CRF 23 0.7 s and 1.9 MB; the session's own encoder re-encodes the background at
#: ~1 Mbps anyway, so the clip's finer quality would not survive. A keyframe every second (set
#: in ``write_clip``) bounds what a seek decodes; no B-frames keeps decode order = display order.
_X264_OPTIONS: Final = {"preset": "ultrafast", "crf": "23", "bf": "0"}

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ClipSpec:
    """What to generate; equal specs give identical frames."""

    #: One of ``CLIP_NAMES``.
    name: str
    #: Length of one loop, seconds.
    seconds: float = 4.0
    #: Frames per second of the clip (the session's own rate is independent of it).
    fps: int = 30
    #: Frame size; the background source scales it to each session's size.
    width: int = 640
    height: int = 480
    #: Seeds every random field of the picture.
    seed: int = 1

    def __post_init__(self) -> None:
        if self.name not in CLIP_NAMES:
            raise ValueError(f"unknown clip {self.name!r}; known clips: {', '.join(CLIP_NAMES)}")
        if not (math.isfinite(self.seconds) and 0.0 < self.seconds <= MAX_SECONDS):
            raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {self.seconds!r}")
        if not (isinstance(self.fps, int) and 1 <= self.fps <= MAX_FPS):
            raise ValueError(f"fps must be an int in 1..{MAX_FPS}, got {self.fps!r}")
        for side_name, side in (("width", self.width), ("height", self.height)):
            if not (isinstance(side, int) and MIN_SIDE <= side <= MAX_SIDE and side % 2 == 0):
                raise ValueError(
                    f"{side_name} must be an even int in {MIN_SIDE}..{MAX_SIDE}, got {side!r}"
                )

    @property
    def frames(self) -> int:
        """Number of frames in one loop (at least one)."""
        return max(1, round(self.seconds * self.fps))

    def file_name(self) -> str:
        """The cache file name: everything that changes the pixels is in it."""
        return (
            f"{self.name}-v{GENERATOR_VERSION}-{self.width}x{self.height}-{self.fps}fps-"
            f"{self.frames}f-s{self.seed}.mp4"
        )


def _periodic_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> F32:
    """Smooth noise in [0, 1] that tiles seamlessly: white noise low-passed in the frequency
    domain (a Gaussian of ``scale`` pixels), so ``np.roll`` over it never shows a seam."""
    white = rng.standard_normal((height, width))
    fy = np.fft.fftfreq(height)[:, np.newaxis]
    fx = np.fft.rfftfreq(width)[np.newaxis, :]
    gain = np.exp(-2.0 * (math.pi * scale) ** 2 * (fx * fx + fy * fy))
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(height, width))
    lo, hi = float(field.min()), float(field.max())
    return ((field - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


@dataclass(frozen=True, slots=True)
class _Blob:
    """A soft disc moving on a closed Lissajous curve (period = one loop)."""

    ycc: tuple[float, float, float]
    radius: float  # as a fraction of the frame's height
    centre: tuple[float, float]  # fractions of width, height
    amplitude: tuple[float, float]  # fractions of width, height
    turns: tuple[int, int]  # whole periods per loop in x, y, so the loop is seamless
    phase: float


#: The warm clip's distractors: orange, red and a skin tone (Cr 188, 198 and 154; the ball's is
#: 222, the detector's threshold 135).
_WARM_BLOBS: Final = (
    _Blob(rgb_to_ycbcr601(255, 140, 0), 0.10, (0.30, 0.35), (0.20, 0.20), (1, 2), 0.0),
    _Blob(rgb_to_ycbcr601(200, 40, 40), 0.08, (0.70, 0.60), (0.20, 0.25), (2, 1), 1.3),
    _Blob(rgb_to_ycbcr601(225, 170, 140), 0.14, (0.50, 0.50), (0.30, 0.15), (1, 1), 2.6),
)
#: The warm band's colour (a brown-orange, Cr 167) and its width as a fraction of the frame's width.
_WARM_BAND_YCC: Final = rgb_to_ycbcr601(190, 110, 60)
_WARM_BAND_WIDTH: Final = 0.10


def _paint_disc(
    planes: tuple[F32, F32, F32], ycc: tuple[float, float, float], cx: float, cy: float, r: float
) -> None:
    """Paint a soft-edged disc (centre and radius in luma pixels) over the three planes, in place.

    Only the disc's bounding box is computed: a whole-frame distance field per blob and plane
    tripled the warm clip's generation time.
    """
    for index, (plane, value) in enumerate(zip(planes, ycc, strict=True)):
        step = 1 if index == 0 else 2  # chroma sample c is centred at luma 2c + 1 (render)
        edge = 2.0 * step  # the same ~2-luma-pixel soft edge in every plane
        rows, cols = plane.shape
        lo_r = max(0, math.floor((cy - r - edge) / step))
        hi_r = min(rows, math.ceil((cy + r + edge) / step) + 1)
        lo_c = max(0, math.floor((cx - r - edge) / step))
        hi_c = min(cols, math.ceil((cx + r + edge) / step) + 1)
        if hi_r <= lo_r or hi_c <= lo_c:
            continue
        centre = 0.5 * step  # luma: pixel j's centre is j + 0.5; chroma: 2c + 1
        gy = np.arange(lo_r, hi_r, dtype=np.float32)[:, np.newaxis] * step + centre - cy
        gx = np.arange(lo_c, hi_c, dtype=np.float32)[np.newaxis, :] * step + centre - cx
        alpha = np.clip((r - np.sqrt(gx * gx + gy * gy)) / edge + 0.5, 0.0, 1.0)
        box = plane[lo_r:hi_r, lo_c:hi_c]
        box += alpha * (value - box)


def clip_frames(spec: ClipSpec) -> Iterator[U8]:
    """The clip's frames, in order, each a new packed I420 array of ``spec``'s size.

    Pure: no codec, no file; the same spec always yields the same frames.
    """
    w, h, n = spec.width, spec.height, spec.frames
    cw, ch = w // 2, h // 2
    rng = np.random.default_rng(spec.seed)
    fine = _periodic_noise(rng, h, w, scale=max(2.0, h / 120))
    coarse = _periodic_noise(rng, ch, cw, scale=max(4.0, h / 24))
    tint = _periodic_noise(rng, ch, cw, scale=max(4.0, h / 16))
    square = max(4, h // 12)
    # A checkerboard one period wider than the frame: a horizontal shift is then a slice.
    yy = np.arange(h)[:, np.newaxis] // square
    xx = np.arange(w + 2 * square)[np.newaxis, :] // square
    checker = (0.15 * ((xx + yy) % 2)).astype(np.float32)
    rows = np.arange(h, dtype=np.float32)[:, np.newaxis] / h
    luma = np.empty((h, w), dtype=np.float32)
    for k in range(n):
        phase = k / n  # 0 .. 1 over one loop
        # Luma: noise scrolling right-down by one full tile per loop, a checkerboard moving
        # left by whole periods, a gradient sweeping down: three motions, no global one.
        np.multiply(np.roll(fine, (round(phase * h), round(phase * w)), axis=(0, 1)), 0.4, luma)
        shift = round(phase * 4 * 2 * square) % (2 * square)
        luma += checker[:, shift : shift + w]
        luma += 0.275 + 0.075 * np.cos(2.0 * math.pi * (rows - phase))  # 0.20 .. 0.90 in all
        y = luma * 219.0 + 16.0
        # Chroma: neutral and cool only. Cb in 128 -17 .. +31 (green to blue), Cr in 128 -26 ..
        # 0 (never warmer than grey); two fields scrolling their own ways.
        c1 = np.roll(coarse, round(-phase * cw), axis=1)
        c2 = np.roll(tint, round(phase * ch), axis=0)
        u = c1 * 48.0 + 111.0
        v = c2 * -26.0 + 128.0
        if spec.name == "warm":
            _paint_warm(spec, phase, (y, u, v))
        out = np.empty((h * 3 // 2, w), dtype=np.uint8)
        for plane, values in zip(i420_planes(out, w, h), (y, u, v), strict=True):
            values += 0.5
            np.clip(values, 0.0, 255.0, out=values)
            plane[...] = values  # truncating the +0.5: rounding
        yield out


def _paint_warm(spec: ClipSpec, phase: float, planes: tuple[F32, F32, F32]) -> None:
    """Draw the warm clip's band and blobs over the texture planes, in place."""
    w, h = spec.width, spec.height
    band_w = _WARM_BAND_WIDTH * w
    # The band enters at the left edge and leaves at the right once per loop.
    band_x = phase * (w + band_w) - band_w / 2
    for index, (plane, value) in enumerate(zip(planes, _WARM_BAND_YCC, strict=True)):
        step = 1 if index == 0 else 2
        xs = np.arange(plane.shape[1], dtype=np.float32) * step + 0.5 * step
        alpha = np.clip((band_w / 2 - np.abs(xs - band_x)) / (2.0 * step), 0.0, 1.0)
        plane += alpha[np.newaxis, :] * (value - plane)
    angle = 2.0 * math.pi * phase
    for blob in _WARM_BLOBS:
        bx = w * (blob.centre[0] + blob.amplitude[0] * math.sin(blob.turns[0] * angle + blob.phase))
        by = h * (blob.centre[1] + blob.amplitude[1] * math.cos(blob.turns[1] * angle + blob.phase))
        _paint_disc(planes, blob.ycc, bx, by, blob.radius * h)


def write_clip(spec: ClipSpec, out: Path) -> Path:
    """Encode ``spec``'s frames to ``out`` (H.264 yuv420p, container from the suffix), atomically.

    The file is written next to ``out`` under a temporary name and renamed into place, so a
    reader (another session generating the same clip, or one that crashed half-way) never sees
    a partial file. Returns ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=spec.fps, options=dict(_X264_OPTIONS))
            stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
            stream.codec_context.gop_size = spec.fps
            stream.codec_context.thread_count = 1
            # Tag the stream BT.601 limited range (SMPTE 170M), what the frames are.
            stream.codec_context.colorspace = 6
            stream.codec_context.color_primaries = 6
            stream.codec_context.color_trc = 6
            stream.codec_context.color_range = 1
            for index, arr in enumerate(clip_frames(spec)):
                frame = av.VideoFrame.from_ndarray(arr, format="yuv420p")
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared cache from other users
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    return (width, height)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m carom_simulator.clip", description="Generate one of Carom's test clips."
    )
    parser.add_argument("name", choices=CLIP_NAMES)
    parser.add_argument("out", type=Path, help="output file (.mp4, .mkv)")
    defaults = ClipSpec(CLIP_NAMES[0])
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--fps", type=int, default=defaults.fps)
    parser.add_argument("--size", type=_size, default=(defaults.width, defaults.height))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    try:
        spec = ClipSpec(
            args.name, args.seconds, args.fps, args.size[0], args.size[1], seed=args.seed
        )
    except ValueError as exc:
        parser.error(str(exc))
    path = write_clip(spec, args.out)
    print(f"{path}: {spec.name}, {spec.frames} frames, {spec.width}x{spec.height} @ {spec.fps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
