"""Tests for Carom's generated background clips: pure frames, then a real libx264 file."""

from __future__ import annotations

import itertools
import stat
from pathlib import Path
from typing import Any

import av as _av
import numpy as np
import pytest

from carom_simulator.clip import CLIP_NAMES, ClipSpec, clip_frames, main, write_clip
from carom_simulator.render import i420_planes

#: PyAV as untyped: the tests read stream attributes its stubs do not describe.
av: Any = _av

SMALL: dict[str, Any] = {"seconds": 1.0, "fps": 12, "width": 64, "height": 48}


def _v(frame: np.ndarray[Any, np.dtype[np.uint8]], spec: ClipSpec) -> Any:
    return i420_planes(frame, spec.width, spec.height)[2]


def test_frames_have_the_layout_and_count() -> None:
    spec = ClipSpec("texture", **SMALL)
    frames = list(clip_frames(spec))
    assert len(frames) == spec.frames == 12
    for frame in frames:
        assert frame.shape == (48 * 3 // 2, 64) and frame.dtype == np.uint8
        assert frame.flags.c_contiguous


def test_frames_are_seeded() -> None:
    first = list(clip_frames(ClipSpec("warm", **SMALL)))
    again = list(clip_frames(ClipSpec("warm", **SMALL)))
    other = list(clip_frames(ClipSpec("warm", **SMALL, seed=2)))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_the_picture_moves_and_loops_without_a_jump() -> None:
    spec = ClipSpec("texture", seconds=2.0, fps=15, width=160, height=120)
    frames = [f.astype(np.int16) for f in clip_frames(spec)]
    steps = [float(np.abs(b - a).mean()) for a, b in itertools.pairwise(frames)]
    assert min(steps) > 1.0  # every frame differs: the encoder has work to do
    wrap = float(np.abs(frames[0] - frames[-1]).mean())
    assert wrap < 2.0 * max(steps)  # last -> first is an ordinary step, not a cut


def test_texture_is_never_warmer_than_grey_and_warm_is() -> None:
    texture = ClipSpec("texture", seconds=2.0, fps=6, width=320, height=240)
    assert max(int(_v(f, texture).max()) for f in clip_frames(texture)) <= 128
    warm = ClipSpec("warm", seconds=2.0, fps=6, width=320, height=240)
    shares = [float((_v(f, warm) > 135).mean()) for f in clip_frames(warm)]
    assert min(shares) > 0.05  # the warm clip is above the page's threshold in every frame


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "sunset"}, "unknown clip"),
        ({"seconds": 0.0}, "seconds"),
        ({"seconds": 61.0}, "seconds"),
        ({"fps": 0}, "fps"),
        ({"fps": 30.0}, "fps"),
        ({"width": 63}, "width"),
        ({"height": 4000}, "height"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"name": "texture", **SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        ClipSpec(**args)


def test_file_name_changes_with_everything_that_changes_pixels() -> None:
    base = ClipSpec("texture")
    names = {
        base.file_name(),
        ClipSpec("warm").file_name(),
        ClipSpec("texture", seed=2).file_name(),
        ClipSpec("texture", width=320, height=240).file_name(),
        ClipSpec("texture", seconds=8.0).file_name(),
    }
    assert len(names) == 5
    assert base.file_name().endswith(".mp4") and "/" not in base.file_name()


def test_written_clip_decodes_as_h264_yuv420p(tmp_path: Path) -> None:
    spec = ClipSpec("warm", **SMALL)
    out = write_clip(spec, tmp_path / "sub" / "warm.mp4")
    assert out == tmp_path / "sub" / "warm.mp4"
    assert sorted(p.name for p in out.parent.iterdir()) == ["warm.mp4"]  # no temp file left
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = list(container.decode(stream))
    assert len(decoded) == spec.frames
    assert {(f.width, f.height, f.format.name) for f in decoded} == {(64, 48, "yuv420p")}
    # Lossy, but the picture is the one generated.
    for frame, source in zip(decoded, clip_frames(spec), strict=True):
        err = np.abs(frame.to_ndarray(format="yuv420p").astype(np.int16) - source).mean()
        assert err < 6.0


def test_writing_is_deterministic(tmp_path: Path) -> None:
    spec = ClipSpec("texture", **SMALL)
    first = write_clip(spec, tmp_path / "a.mp4").read_bytes()
    assert write_clip(spec, tmp_path / "b.mp4").read_bytes() == first


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.mkv"
    assert main(["texture", str(out), "--seconds", "0.5", "--fps", "8", "--size", "32x24"]) == 0
    assert "4 frames, 32x24" in capsys.readouterr().out
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.width == 32
    with pytest.raises(SystemExit):
        main(["texture", str(out), "--size", "33x24"])
    with pytest.raises(SystemExit):
        main(["nope", str(out)])
    assert set(CLIP_NAMES) == {"texture", "warm"}
