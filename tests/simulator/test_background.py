"""Tests for video-file backgrounds: real PyAV decoding of generated clips, looping, scaling,
freeing, name resolution, and the colour-interference check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av as _av
import numpy as np
import numpy.typing as npt
import pytest

from carom_client.centroid import V_THRESHOLD as PAGE_V_THRESHOLD
from carom_simulator.background import (
    INTERFERENCE_OFF_BALL,
    PLAIN,
    V_THRESHOLD,
    BackgroundSource,
    available,
    check_background,
    chroma_interference,
    measure_interference,
    open_background,
    resolve_background,
)
from carom_simulator.clip import ClipSpec, write_clip
from carom_simulator.render import i420_planes

#: PyAV as untyped, as in the other tests.
av: Any = _av

U8 = npt.NDArray[np.uint8]
#: 10 frames of 1/10 s: clip frame k is shown over [k / 10, (k + 1) / 10).
SPEC = ClipSpec("texture", seconds=1.0, fps=10, width=64, height=48)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(SPEC, tmp_path_factory.mktemp("clips") / "texture.mp4")


@pytest.fixture(scope="module")
def reference(clip: Path) -> list[U8]:
    """Every frame of the clip as PyAV decodes it, in order: what the source must hand out."""
    with av.open(str(clip)) as container:
        return [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]


@pytest.fixture
def source(clip: Path) -> Iterator[BackgroundSource]:
    with BackgroundSource(clip) as src:
        yield src


def _open_fds_on(path: Path) -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd) == str(path)
        except OSError:
            continue  # closed between listing and reading
    return count


def test_threshold_matches_the_page() -> None:
    assert V_THRESHOLD == PAGE_V_THRESHOLD


def test_sequential_frames_loop(source: BackgroundSource, reference: list[U8]) -> None:
    assert len(reference) == 10
    assert source.duration is None  # learned at the first end of the clip
    for index in range(35):
        np.testing.assert_array_equal(source.frame(index, 10.0, 64, 48), reference[index % 10])
    assert source.duration == 1


@pytest.mark.parametrize(("fps", "clip_frame"), [(20.0, lambda i: i // 2), (5.0, lambda i: 2 * i)])
def test_other_session_rates_repeat_or_skip(
    source: BackgroundSource, reference: list[U8], fps: float, clip_frame: Any
) -> None:
    for index in range(30):
        want = reference[clip_frame(index) % 10]
        np.testing.assert_array_equal(source.frame(index, fps, 64, 48), want)


def test_jumps_backwards_and_far_ahead(source: BackgroundSource, reference: list[U8]) -> None:
    # Far beyond the end before the length is known, back to the start, into the middle.
    for index in (7, 3, 1234, 0, 9, 5, 5, 10, 21, 2, 999_999):
        np.testing.assert_array_equal(source.frame(index, 10.0, 64, 48), reference[index % 10])


def test_resizes_and_caches_one_conversion(source: BackgroundSource, reference: list[U8]) -> None:
    big = source.frame(3, 10.0, 128, 96)
    assert big.shape == (96 * 3 // 2, 128) and big.dtype == np.uint8
    assert not big.flags.writeable  # shared: nobody draws on it
    assert source.frame(3, 10.0, 128, 96) is big  # same clip frame, same size: no new work
    small = source.frame(3, 10.0, 32, 24)
    assert small.shape == (24 * 3 // 2, 32)
    # Scaled, it is still the same picture (its mean brightness, say).
    y_ref = i420_planes(reference[3], 64, 48)[0].mean()
    for arr, (w, h) in ((big, (128, 96)), (small, (32, 24))):
        assert abs(float(i420_planes(arr, w, h)[0].mean()) - float(y_ref)) < 2.0
    np.testing.assert_array_equal(source.frame(3, 10.0, 64, 48), reference[3])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 10.0, 64, 48), "index"),
        ((1.0, 10.0, 64, 48), "index"),
        ((0, 0.0, 64, 48), "fps"),
        ((0, float("nan"), 64, 48), "fps"),
        ((0, 10.0, 63, 48), "width"),
        ((0, 10.0, 64, 100_000), "height"),
    ],
)
def test_bad_frame_args(source: BackgroundSource, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        source.frame(*args)


def test_close_frees_the_file(clip: Path) -> None:
    before = _open_fds_on(clip)
    src = BackgroundSource(clip)
    src.frame(4, 10.0, 64, 48)
    assert _open_fds_on(clip) == before + 1
    src.close()
    assert _open_fds_on(clip) == before
    src.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        src.frame(0, 10.0, 64, 48)


def test_not_a_video_fails_at_open(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(av.error.FFmpegError):
        BackgroundSource(bad)
    assert _open_fds_on(bad) == 0


# ------------------------------------------------------------------------------------- names


def test_plain_is_no_file(tmp_path: Path) -> None:
    assert resolve_background(PLAIN, None, cache_dir=tmp_path) is None
    assert open_background(PLAIN, None, cache_dir=tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_builtin_clip_is_generated_once_into_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "backgrounds"
    path = resolve_background("texture", None, cache_dir=cache)
    assert (
        path is not None and path.parent == cache and path.name == ClipSpec("texture").file_name()
    )
    assert [p.name for p in cache.iterdir()] == [path.name]  # nothing half-written left over
    stamp = path.stat().st_mtime_ns
    assert resolve_background("texture", None, cache_dir=cache) == path
    assert path.stat().st_mtime_ns == stamp  # not generated again
    bg = open_background("texture", None, cache_dir=cache)
    assert bg is not None
    try:
        assert bg.frame(0, 30.0, 640, 480).shape == (720, 640)
    finally:
        bg.close()


def test_named_file_in_the_configured_directory(tmp_path: Path, clip: Path) -> None:
    (tmp_path / "lobby.mkv").write_bytes(clip.read_bytes())  # an mp4 named .mkv still decodes
    (tmp_path / "Not_Valid.mp4").write_bytes(b"")  # no session could name it
    assert resolve_background("lobby", tmp_path, cache_dir=tmp_path) == tmp_path / "lobby.mkv"
    assert available(tmp_path) == ["plain", "texture", "warm", "lobby"]
    with pytest.raises(ValueError, match=r"unknown background 'hall': known are plain, texture"):
        resolve_background("hall", tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown background 'lobby'"):
        resolve_background("lobby", None, cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["../etc/passwd", "lobby.mkv", "", "A", "x" * 40])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not valid"):
        resolve_background(name, tmp_path, cache_dir=tmp_path)


# ------------------------------------------------------------------------------ interference


def test_chroma_interference_counts_samples_above_the_threshold() -> None:
    frame = np.full((48 * 3 // 2, 64), 128, dtype=np.uint8)
    _, _, v = i420_planes(frame, 64, 48)
    assert chroma_interference(frame, 64, 48) == 0.0
    v[0, :8] = V_THRESHOLD  # at the threshold: not ball
    assert chroma_interference(frame, 64, 48) == 0.0
    v[0, :8] = V_THRESHOLD + 1
    assert chroma_interference(frame, 64, 48) == 8 / (32 * 24)


def test_measured_interference_of_the_clips(clip: Path, tmp_path: Path) -> None:
    cool = measure_interference(clip, 64, 48)
    assert cool.samples == 4 and cool.worst == 0.0  # 1 s sampled every 0.25 s, one loop
    warm = write_clip(
        ClipSpec("warm", seconds=1.0, fps=10, width=64, height=48), tmp_path / "w.mp4"
    )
    hot = measure_interference(warm, 64, 48)
    assert 0.05 < hot.mean <= hot.worst < 0.5
    with pytest.raises(ValueError, match="every_s"):
        measure_interference(clip, 64, 48, every_s=0.0)


def test_check_background() -> None:
    assert check_background(0.0) is None
    mild = check_background(1.3e-5)
    assert mild is not None and "Cr > 135" in mild and "pulled towards" in mild
    severe = check_background(INTERFERENCE_OFF_BALL)
    assert severe is not None and "not be on the ball" in severe
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            check_background(bad)
