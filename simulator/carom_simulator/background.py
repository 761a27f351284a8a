"""Video-file backgrounds: a looping clip, decoded with PyAV and scaled to the session's size.

A session names its background (``carom.signaling.Background``): ``plain`` is the renderer's own
black frame; ``texture`` and ``warm`` are Carom's generated clips (``carom_simulator.clip``),
written on first use into a cache directory; any other name is ``<name>.mp4`` (or ``.webm``,
``.mkv``) in the directory the operator configured. ``resolve_background`` maps a name to a file,
``open_background`` opens it as a ``BackgroundSource``.

Time. Session frame ``i`` at ``fps`` shows the clip at ``t = i / fps`` modulo the clip's length,
in exact fractions (a float ``fmod`` put frame 121 of a 30 fps session on the 4 s clip's frame 0
instead of 1). The picture at ``t`` is the last clip frame whose timestamp is ``<= t``: a slower
session skips clip frames, a faster one repeats them, the same rule a player follows. The clip's
length is learned when the decoder first reaches its end (the last frame's timestamp plus its
duration), not taken from container metadata, which some files (WebM) lack or round.

Decoding. The source holds one PyAV container and decoder and reads forward; a request behind
the current frame, or more than ``SEEK_AHEAD`` ahead of it, seeks to the keyframe before the
target instead (so a backwards jump, a loop or a session that skipped ahead costs at most one
GOP of decoding). It holds at most two decoded frames (the one on screen and the next one) and
one converted array, whatever the clip's length: nothing grows with a session's life.

Threads. A source is not thread-safe: the track calls it from its generation job, one job at a
time per session, on the simulator's executor (never on the event loop: decoding and scaling a
frame are milliseconds of CPU). Its decoder and scaler are single-threaded for the same reason
the encoder is (``carom_simulator.encoder``): many sessions share few cores.

Interference. The page finds the ball as the chroma samples whose Cr exceeds ``V_THRESHOLD``; a
background with such samples pulls the centroid towards them. ``measure_interference`` samples
a clip at the session's size, ``check_background`` turns the worst sampled frame into a warning
(thresholds and measurements in its docstring; ``bench/background.py`` measured them).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import av
import msgspec
import numpy as np
import numpy.typing as npt
from av.video.reformatter import VideoReformatter

from carom import detection
from carom.signaling import Background
from carom_simulator.clip import CLIP_NAMES, ClipSpec, write_clip
from carom_simulator.physics import MAX_FPS, MAX_FRAME_SIDE
from carom_simulator.render import i420_planes

__all__ = [
    "DEFAULT_CACHE_DIR",
    "INTERFERENCE_LIMIT",
    "INTERFERENCE_OFF_BALL",
    "PLAIN",
    "SEEK_AHEAD",
    "VIDEO_SUFFIXES",
    "V_THRESHOLD",
    "BackgroundSource",
    "Interference",
    "check_background",
    "chroma_interference",
    "measure_interference",
    "open_background",
    "resolve_background",
]

#: The background that is no file: the renderer's black frame.
PLAIN: Final = "plain"
#: File types a configured directory may hold, in the order a name is looked up.
VIDEO_SUFFIXES: Final = (".mp4", ".webm", ".mkv")
#: Where the built-in clips are written on first use.
DEFAULT_CACHE_DIR: Final = Path("~/.cache/carom/backgrounds")
#: A request more than this far ahead of the frame on screen seeks instead of decoding forward:
#: the built-in clips have a keyframe every second, so past one second a seek decodes less.
SEEK_AHEAD: Final = Fraction(1)
#: The page's detector (``carom.detection``): a chroma sample is ball when its Cr exceeds it.
V_THRESHOLD: Final = detection.V_THRESHOLD
#: Largest share of a background's chroma samples above ``V_THRESHOLD`` (worst sampled frame)
#: that ``check_background`` lets pass silently: none. Measured (bench/background.py, 640x480,
#: 1 Mbps): a single ball-coloured chroma sample in the texture clip (a share of 1.3e-5) already
#: raised the mean error from 0.31 to 1.09 px (p99 1.27 to 3.75 px) and made the detector find a
#: "ball" in 95% of frames without one; no share above zero was harmless for every colour.
INTERFERENCE_LIMIT: Final = 0.0
#: From this share on, most reported positions are not on the ball at all (farther than its
#: radius from the truth): measured 59% of frames at 3.3e-4 with a ball-coloured patch, 48% at
#: 1.0e-3 with a skin-toned one, and all of them over the ``warm`` clip (1.8e-1).
INTERFERENCE_OFF_BALL: Final = 3e-4
#: A clip larger than this on either side is refused: every frame of it is decoded.
MAX_CLIP_SIDE: Final = 4096
#: Upper bound on the frames ``measure_interference`` decodes and converts.
MAX_INTERFERENCE_SAMPLES: Final = 240

U8 = npt.NDArray[np.uint8]

#: FFmpeg's AVColorSpace codes a decoded frame carries, as the swscale matrix to read it with;
#: anything else (untagged included) is read as BT.601, what libx264 and browsers assume for SD.
_SWS_MATRIX: Final = {1: "ITU709", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
#: FFmpeg's AVColorRange code for full ("JPEG") range.
_FULL_RANGE: Final = 2

#: One lock for generating built-in clips: two sessions asking for the same clip at once would
#: otherwise both spend the seconds it takes (the rename keeps either result correct anyway).
_generate_lock = threading.Lock()


def resolve_background(
    name: str, directory: Path | None, *, cache_dir: Path | None = None
) -> Path | None:
    """The file behind background ``name``; None for ``plain``.

    ``texture`` and ``warm`` are generated into ``cache_dir`` (default ``DEFAULT_CACHE_DIR``,
    created as needed) the first time they are asked for; the write is atomic (temporary file,
    then rename), so concurrent sessions or processes never read a half-written clip. Any other
    name must be a file ``<name><suffix>`` in ``directory`` for a suffix of ``VIDEO_SUFFIXES``.
    Raises ``ValueError`` naming what is available when ``name`` is not valid or not found.
    """
    try:
        msgspec.convert(name, Background)  # the protocol's own rule: no dots, no slashes
    except msgspec.ValidationError as exc:
        raise ValueError(f"background name {name!r} is not valid: {exc}") from None
    if name == PLAIN:
        return None
    if name in CLIP_NAMES:
        spec = ClipSpec(name)
        cache = (cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
        path = cache / spec.file_name()
        with _generate_lock:
            if not path.is_file():
                write_clip(spec, path)
        return path
    if directory is not None:
        for suffix in VIDEO_SUFFIXES:
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise ValueError(f"unknown background {name!r}: known are {', '.join(available(directory))}")


def available(directory: Path | None) -> list[str]:
    """Every background name ``resolve_background`` accepts, sorted after the built-in ones."""
    names = {PLAIN, *CLIP_NAMES}
    files: set[str] = set()
    if directory is not None and directory.is_dir():
        for path in directory.iterdir():
            if path.suffix in VIDEO_SUFFIXES and path.is_file():
                try:
                    files.add(msgspec.convert(path.stem, Background))
                except msgspec.ValidationError:
                    continue  # a file no session could name
    return [PLAIN, *CLIP_NAMES, *sorted(files - names)]


def open_background(
    name: str, directory: Path | None, *, cache_dir: Path | None = None
) -> BackgroundSource | None:
    """``BackgroundSource`` for ``name`` (see ``resolve_background``); None for ``plain``.

    Blocking (it may generate a clip, and it decodes the first frame so that a file that is not
    a video fails here, at session start): call it on an executor thread.
    """
    path = resolve_background(name, directory, cache_dir=cache_dir)
    return None if path is None else BackgroundSource(path)


@dataclass(frozen=True, slots=True)
class _Decoded:
    """A decoded clip frame and where it sits on the clip's timeline."""

    frame: Any  # av.VideoFrame
    #: Seconds since the clip's first frame.
    t: Fraction
    #: Counts decoded frames: tells a cached conversion from a stale one.
    serial: int


class BackgroundSource:
    """A video file as an endless sequence of I420 backgrounds (module docstring).

    ``frame(index, fps, width, height)`` returns a read-only packed I420 array (the layout
    ``carom_simulator.render`` documents); asking twice for the same clip frame at the same size
    returns the same array without decoding or scaling again. ``close()`` frees the container,
    decoder and scaler; it is idempotent, and ``frame`` raises afterwards.
    """

    def __init__(self, path: Path) -> None:
        self.path: Final = Path(path)
        container: Any = av.open(str(self.path), mode="r")
        try:
            if not container.streams.video:
                raise ValueError(f"{self.path}: no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if not (0 < ctx.width <= MAX_CLIP_SIDE and 0 < ctx.height <= MAX_CLIP_SIDE):
                raise ValueError(
                    f"{self.path}: {ctx.width}x{ctx.height} is outside 1..{MAX_CLIP_SIDE}"
                )
            ctx.thread_count = 1
            self._container: Any = container
            self._stream: Any = stream
            self._time_base = Fraction(stream.time_base)
            rate = stream.average_rate or stream.guessed_rate
            self._rate: Fraction | None = Fraction(rate) if rate else None
            self._decoder: Iterator[Any] | None = None
            self._serial = 0
            self._origin_pts = 0
            self._end: Fraction | None = None
            self._ahead: _Decoded | None = None
            self._interval: Fraction | None = None
            self._cache: tuple[tuple[int, int, int], U8] | None = None
            self._reformatter: Any = VideoReformatter()
            self._decoder = container.decode(stream)
            first = self._decode_next(None)
            if first is None:
                raise ValueError(f"{self.path}: no decodable video frame")
            self._origin_pts = first.frame.pts if first.frame.pts is not None else 0
            self._current: _Decoded | None = _Decoded(first.frame, Fraction(0), first.serial)
        except BaseException:
            container.close()
            raise

    @property
    def duration(self) -> Fraction | None:
        """The clip's length in seconds, once the decoder has reached its end (else None)."""
        return self._end

    @property
    def nominal_duration(self) -> float | None:
        """The container's own idea of the clip's length (may be missing or rounded)."""
        container = self._require_open()
        if self._stream.duration:
            return float(self._stream.duration * self._time_base)
        if container.duration:
            return float(container.duration) / av.time_base
        return None

    def frame(self, index: int, fps: float, width: int, height: int) -> U8:
        """The background of session frame ``index`` at ``fps``, as ``width x height`` I420."""
        self._require_open()
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be an int >= 0, got {index!r}")
        if not (math.isfinite(fps) and 0.0 < fps <= MAX_FPS):
            raise ValueError(f"fps must be in (0, {MAX_FPS:g}], got {fps!r}")
        for name, side in (("width", width), ("height", height)):
            if not (isinstance(side, int) and 2 <= side <= MAX_FRAME_SIDE and side % 2 == 0):
                raise ValueError(f"{name} must be an even int in 2..{MAX_FRAME_SIDE}, got {side!r}")
        t = Fraction(index) / Fraction(fps)
        if self._end is not None:
            t %= self._end
        shown = self._frame_at(t)
        key = (shown.serial, width, height)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        arr = self._convert(shown.frame, width, height)
        arr.flags.writeable = False  # shared between calls: nobody may draw on it
        self._cache = (key, arr)
        return arr

    def close(self) -> None:
        """Free the decoder, the container (its file) and the scaler; idempotent."""
        if self._decoder is not None:
            close = getattr(self._decoder, "close", None)
            if close is not None:
                close()
            self._decoder = None
        self._current = self._ahead = None
        self._cache = None
        self._reformatter = None
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> BackgroundSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _require_open(self) -> Any:
        if self._container is None:
            raise RuntimeError(f"background {self.path} is closed")
        return self._container

    def _frame_at(self, t: Fraction) -> _Decoded:
        """The clip frame on screen at ``t`` (seconds since the clip's first frame)."""
        cur = self._current
        if cur is None or t < cur.t or t - cur.t > SEEK_AHEAD:
            cur = self._seek(t)
        while True:
            nxt = self._ahead if self._ahead is not None else self._decode_next(cur)
            self._ahead = nxt
            if nxt is None:  # the clip ended: its length is now known
                end = cur.t + self._last_duration(cur)
                self._end = end
                if t < end:
                    return cur
                t %= end
                if t >= cur.t:
                    return cur
                cur = self._seek(t)
                continue
            if nxt.t > t:
                return cur
            self._current, self._ahead, cur = nxt, None, nxt

    def _seek(self, t: Fraction) -> _Decoded:
        """Restart decoding at the keyframe at or before ``t``; returns the first frame."""
        if self._decoder is not None:
            self._decoder.close()  # type: ignore[attr-defined]
        self._current = self._ahead = None
        target = self._origin_pts + math.floor(t / self._time_base)
        self._container.seek(target, stream=self._stream, backward=True)
        self._decoder = self._container.decode(self._stream)
        first = self._decode_next(None)
        if first is None and target != self._origin_pts:  # sought past the last keyframe
            self._container.seek(self._origin_pts, stream=self._stream, backward=True)
            self._decoder = self._container.decode(self._stream)
            first = self._decode_next(None)
        if first is None:
            raise ValueError(f"{self.path}: no frame decodes after a seek to {float(t):.3f} s")
        self._current = first
        return first

    def _decode_next(self, prev: _Decoded | None) -> _Decoded | None:
        """The next decoded frame, or None at the end of the clip."""
        assert self._decoder is not None
        frame = next(self._decoder, None)
        if frame is None:
            return None
        self._serial += 1
        if frame.pts is not None:
            t = (frame.pts - self._origin_pts) * self._time_base
        elif prev is not None:  # no timestamp: one frame interval after the previous frame
            t = prev.t + (self._interval or (1 / self._rate if self._rate else Fraction(1)))
        else:
            t = Fraction(0)
        if prev is not None and t > prev.t:
            self._interval = t - prev.t
        return _Decoded(frame, t, self._serial)

    def _last_duration(self, last: _Decoded) -> Fraction:
        """How long the clip's last frame is shown: its own duration, else the frame interval."""
        own = getattr(last.frame, "duration", None)
        if own:
            return own * self._time_base  # type: ignore[no-any-return]
        if self._interval:
            return self._interval
        if self._rate:
            return 1 / self._rate
        return Fraction(1)  # a one-frame clip without timing: any length shows it forever

    def _convert(self, frame: Any, width: int, height: int) -> U8:
        """Scale ``frame`` to ``width x height`` and convert it to BT.601 limited-range I420."""
        out = self._reformatter.reformat(
            frame,
            width=width,
            height=height,
            format="yuv420p",
            src_colorspace=_SWS_MATRIX.get(frame.colorspace, "ITU601"),
            dst_colorspace="ITU601",
            src_color_range="JPEG" if frame.color_range == _FULL_RANGE else "MPEG",
            dst_color_range="MPEG",
            interpolation="BILINEAR",
            threads=1,
        )
        arr: U8 = np.ascontiguousarray(out.to_ndarray(format="yuv420p"))
        if arr.shape != (height * 3 // 2, width):
            raise ValueError(f"{self.path}: converted frame has shape {arr.shape}")
        return arr


def chroma_interference(i420: U8, width: int, height: int) -> float:
    """Share of the frame's chroma samples whose Cr exceeds ``V_THRESHOLD`` (0..1)."""
    _, _, v = i420_planes(i420, width, height)
    return float(np.count_nonzero(v > V_THRESHOLD)) / v.size


@dataclass(frozen=True, slots=True)
class Interference:
    """How much of a background the page's colour threshold would take for ball."""

    #: Frames sampled.
    samples: int
    #: Mean over the sampled frames of ``chroma_interference``.
    mean: float
    #: The largest ``chroma_interference`` of any sampled frame: what ``check_background`` reads.
    worst: float


def measure_interference(
    path: Path, width: int, height: int, *, every_s: float = 0.25, max_samples: int = 120
) -> Interference:
    """Sample the clip at ``path`` every ``every_s`` seconds (wider for a clip longer than
    ``max_samples * every_s``, from its metadata), at the session's size, over one loop.

    Blocking (decodes the clip once): call it on an executor thread, at session start.
    """
    if not (math.isfinite(every_s) and every_s > 0.0):
        raise ValueError(f"every_s must be a finite number > 0, got {every_s!r}")
    if not 1 <= max_samples <= MAX_INTERFERENCE_SAMPLES:
        raise ValueError(f"max_samples must be in 1..{MAX_INTERFERENCE_SAMPLES}")
    fractions: list[float] = []
    with BackgroundSource(path) as source:
        nominal = source.nominal_duration
        step = max(every_s, nominal / max_samples if nominal else 0.0)
        fps = min(1.0 / step, MAX_FPS)
        for k in range(max_samples):
            arr = source.frame(k, fps, width, height)
            end = source.duration
            if end is not None and Fraction(k) / Fraction(fps) >= end:
                break  # wrapped around: one loop is sampled
            fractions.append(chroma_interference(arr, width, height))
    return Interference(len(fractions), sum(fractions) / len(fractions), max(fractions))


def check_background(interference: float) -> str | None:
    """The warning for a background whose worst sampled frame has this share of chroma samples
    above the page's threshold (``Interference.worst``); None when it has none.

    Accept and flag, not refuse: a warning, because the measurement (``INTERFERENCE_LIMIT``)
    leaves no safe share above zero, so a refusal would turn away nearly every real video (skin,
    wood, a red shirt) along with the ``warm`` clip whose purpose is to show this failure; while
    the frames' identity, and with it every latency Carom measures, does not depend on where the
    detector thinks the ball is. What goes wrong is the position, and this text says so, to be
    carried with the session (its answer and its report) so no L2 figure is read without it.
    """
    if not (math.isfinite(interference) and 0.0 <= interference <= 1.0):
        raise ValueError(f"interference must be a share in 0..1, got {interference!r}")
    if interference <= INTERFERENCE_LIMIT:
        return None
    effect = (
        "most reported positions will not be on the ball at all"
        if interference >= INTERFERENCE_OFF_BALL
        else "reported positions will be pulled towards them, and a frame without the ball "
        "may still report one"
    )
    return (
        f"background: {interference:.2g} of its chroma samples (worst frame) are above the "
        f"page's colour threshold (Cr > {V_THRESHOLD}); {effect}"
    )
