"""Tests for the I420/RGB ball renderer: sub-pixel accuracy, colour matrix, PyAV layout."""

from __future__ import annotations

import math
import random
from typing import Any

import av as _av
import numpy as np
import numpy.typing as npt
import pytest

from carom_client.centroid import centroid_i420
from carom_simulator.render import BALL_RGB, Renderer, i420_planes, rgb_to_ycbcr601

#: PyAV as untyped, as the tests poke at planes and buffers its stubs do not describe.
av: Any = _av

W, H = 640, 480


def _weighted_centroid(weights: npt.NDArray[np.float64]) -> tuple[float, float]:
    total = weights.sum()
    cx = weights.sum(axis=0) @ (np.arange(weights.shape[1]) + 0.5) / total
    cy = weights.sum(axis=1) @ (np.arange(weights.shape[0]) + 0.5) / total
    return (float(cx), float(cy))


def _luma_centroid(frame: npt.NDArray[np.uint8], width: int, height: int) -> tuple[float, float]:
    y_plane, _, _ = i420_planes(frame, width, height)
    return _weighted_centroid(y_plane.astype(np.float64) - 16.0)


def _rgb_centroid(rgb: npt.NDArray[np.uint8]) -> tuple[float, float]:
    return _weighted_centroid(rgb[:, :, 0].astype(np.float64))


def _positions(radius: float, count: int, seed: int) -> list[tuple[float, float]]:
    """Random sub-pixel centres, a third of them within half a pixel of a wall or corner.

    The disc stays inside the frame ``[0, side]`` (continuous pixel coordinates), as the physics
    keeps it.
    """
    rng = random.Random(seed)
    lo_x, hi_x = radius, W - radius
    lo_y, hi_y = radius, H - radius
    out = []
    for i in range(count):
        x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        if i % 3 == 0:
            x = lo_x + 0.5 * rng.random() if rng.random() < 0.5 else hi_x - 0.5 * rng.random()
        if i % 3 == 1:
            y = lo_y + 0.5 * rng.random() if rng.random() < 0.5 else hi_y - 0.5 * rng.random()
        out.append((x, y))
    return out


def test_bt601_limited_range_conversion() -> None:
    assert rgb_to_ycbcr601(0, 0, 0) == pytest.approx((16.0, 128.0, 128.0))
    assert rgb_to_ycbcr601(255, 255, 255) == pytest.approx((235.0, 128.0, 128.0))
    assert rgb_to_ycbcr601(255, 0, 0) == pytest.approx((81.481, 90.203, 240.0), abs=1e-3)
    assert rgb_to_ycbcr601(0, 0, 255) == pytest.approx((40.966, 240.0, 109.786), abs=1e-3)


def test_i420_layout_and_colours() -> None:
    renderer = Renderer(W, H, 20.0)
    frame = renderer.render_i420(300.0, 200.0)
    assert frame.shape == (H * 3 // 2, W)
    assert frame.dtype == np.uint8
    assert frame.flags.c_contiguous
    y_plane, u_plane, v_plane = i420_planes(frame, W, H)
    assert y_plane.shape == (H, W)
    assert u_plane.shape == v_plane.shape == (H // 2, W // 2)
    ball = [round(c) for c in rgb_to_ycbcr601(*BALL_RGB)]
    assert [y_plane[200, 300], u_plane[100, 150], v_plane[100, 150]] == ball
    assert [y_plane[0, 0], u_plane[0, 0], v_plane[0, 0]] == [16, 128, 128]
    # The U plane is the quarter-size block right after Y, V the one after U.
    flat = frame.reshape(-1)
    assert flat[W * H + 100 * (W // 2) + 150] == ball[1]
    assert flat[W * H * 5 // 4 + 100 * (W // 2) + 150] == ball[2]


def test_ball_outside_the_frame_leaves_background() -> None:
    renderer = Renderer(W, H, 20.0)
    for x, y in ((-100.0, 200.0), (300.0, 1000.0)):
        frame = renderer.render_i420(x, y)
        y_plane, u_plane, v_plane = i420_planes(frame, W, H)
        assert (y_plane == 16).all() and (u_plane == 128).all() and (v_plane == 128).all()
        assert not renderer.render_rgb(x, y).any()


def test_coverage_is_exact_area() -> None:
    renderer = Renderer(W, H, 13.7)
    for x, y in _positions(13.7, 50, seed=3):
        top, left, cov = renderer.coverage(x, y)
        assert top % 2 == 0 and left % 2 == 0 and cov.shape[0] % 2 == 0 and cov.shape[1] % 2 == 0
        assert ((cov >= 0.0) & (cov <= 1.0)).all()
        assert cov.sum() == pytest.approx(math.pi * 13.7**2, rel=1e-9)
        cx, cy = _weighted_centroid(cov)
        assert cx + left == pytest.approx(x, abs=0.01)
        assert cy + top == pytest.approx(y, abs=0.01)


@pytest.mark.parametrize("radius", [6.0, 20.0, 41.3])
def test_rendered_centroid_matches_true_centre(radius: float) -> None:
    renderer = Renderer(W, H, radius)
    for x, y in _positions(radius, 120, seed=int(radius * 10)):
        lx, ly = _luma_centroid(renderer.render_i420(x, y), W, H)
        assert abs(lx - x) < 0.05 and abs(ly - y) < 0.05, (x, y, lx, ly)
        rx, ry = _rgb_centroid(renderer.render_rgb(x, y))
        assert abs(rx - x) < 0.05 and abs(ry - y) < 0.05, (x, y, rx, ry)


def test_ball_touching_every_wall() -> None:
    # The physics confines the centre to [r, side - r], which in Carom's continuous pixel
    # coordinates is exactly the frame: a ball touching any wall loses nothing.
    renderer = Renderer(W, H, 20.0)
    for x, y in ((620.0, 240.3), (320.2, 460.0), (620.0, 460.0), (20.0, 20.0), (20.0, 460.0)):
        lx, ly = _luma_centroid(renderer.render_i420(x, y), W, H)
        assert abs(lx - x) < 0.05 and abs(ly - y) < 0.05, (x, y, lx, ly)


def test_rgb_render_colour() -> None:
    rgb = Renderer(W, H, 20.0, color=(10, 200, 30)).render_rgb(100.0, 100.0)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert rgb[100, 100].tolist() == [10, 200, 30]
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert Renderer(W, H, 20.0).render_rgb(100.0, 100.0)[100, 100].tolist() == list(BALL_RGB)


def test_every_frame_is_a_new_array_the_caller_owns() -> None:
    renderer = Renderer(W, H, 20.0)
    first = renderer.render_i420(100.0, 100.0)
    keep = first.copy()
    second = renderer.render_i420(400.0, 300.0)
    assert not np.shares_memory(first, second)
    first[...] = 0  # scribbling on a returned frame must not leak into later frames
    np.testing.assert_array_equal(renderer.render_i420(100.0, 100.0), keep)
    assert second.flags.writeable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 641}, "even"),
        ({"height": 0}, "even"),
        ({"width": 640.0}, "ints"),
        ({"radius": 0.0}, "radius"),
        ({"radius": math.nan}, "radius"),
        ({"color": (256, 0, 0)}, "color"),
        ({"color": (255, 0)}, "color"),
    ],
)
def test_bad_renderer_args(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, Any] = {"width": W, "height": H, "radius": 20.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        Renderer(**args)


def test_i420_planes_rejects_wrong_size() -> None:
    with pytest.raises(ValueError, match="needs"):
        i420_planes(np.zeros((10, 10), dtype=np.uint8), 10, 10)
    with pytest.raises(ValueError, match="even"):
        i420_planes(np.zeros(15 * 9 // 2, dtype=np.uint8), 5, 9)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (66, 38)])
def test_layout_matches_pyav(width: int, height: int) -> None:
    renderer = Renderer(width, height, 9.0)
    frame = renderer.render_i420(width / 2 + 0.3, height / 2 - 0.2)
    video = av.VideoFrame.from_ndarray(frame, format="yuv420p")
    assert (video.width, video.height) == (width, height)
    # Plane by plane, through PyAV's own (possibly padded) buffers.
    for plane, ours in zip(video.planes, i420_planes(frame, width, height), strict=True):
        theirs = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        np.testing.assert_array_equal(theirs[:, : plane.width], ours)
    np.testing.assert_array_equal(video.to_ndarray(format="yuv420p"), frame)
    # swscale's default matrix for untagged yuv420p is BT.601 limited: the colour comes back.
    rgb = video.to_ndarray(format="rgb24")
    centre = rgb[height // 2, width // 2].astype(int)
    assert np.abs(centre - np.array(BALL_RGB)).max() <= 2


# ------------------------------------------------------------------- drawing over a background


def _uniform(width: int, height: int, ycc: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    frame = np.empty((height * 3 // 2, width), dtype=np.uint8)
    for plane, value in zip(i420_planes(frame, width, height), ycc, strict=True):
        plane[...] = value
    return frame


def test_background_equal_to_black_gives_the_plain_frame() -> None:
    renderer = Renderer(W, H, 20.0)
    black = _uniform(W, H, (16, 128, 128))
    for x, y in _positions(20.0, 60, seed=5):
        np.testing.assert_array_equal(
            renderer.render_i420(x, y, background=black), renderer.render_i420(x, y)
        )


def test_page_centroid_exact_over_a_plain_coloured_background() -> None:
    # Neutral grey has Cr 128, like black: the V plane the page reads is the plain one, so the
    # detector's answer is identical and as exact; the luma centroid (ball minus background)
    # stays as exact as on black too.
    renderer = Renderer(W, H, 20.0)
    grey = _uniform(W, H, (126, 128, 128))
    grey.flags.writeable = False  # a source's shared read-only array is accepted, never written
    for x, y in _positions(20.0, 120, seed=9):
        frame = renderer.render_i420(x, y, background=grey)
        found = centroid_i420(frame, W, H)
        assert found == centroid_i420(renderer.render_i420(x, y), W, H)
        assert found is not None and math.hypot(found[0] - x, found[1] - y) < 0.05, (x, y, found)
        y_plane, _, _ = i420_planes(frame, W, H)
        lx, ly = _weighted_centroid(np.abs(y_plane.astype(np.float64) - 126.0))
        assert abs(lx - x) < 0.05 and abs(ly - y) < 0.05, (x, y, lx, ly)
    assert (grey == _uniform(W, H, (126, 128, 128))).all()


def test_ball_blends_over_a_textured_background() -> None:
    renderer = Renderer(W, H, 20.0)
    rng = np.random.default_rng(3)
    texture = rng.integers(16, 236, size=(H * 3 // 2, W), dtype=np.uint8)
    frame = renderer.render_i420(300.4, 200.7, background=texture)
    ball = [round(c) for c in rgb_to_ycbcr601(*BALL_RGB)]
    y_plane, u_plane, v_plane = i420_planes(frame, W, H)
    assert [y_plane[200, 300], u_plane[100, 150], v_plane[100, 150]] == ball  # fully covered
    # Away from the ball the texture is untouched; on the rim it is the coverage-weighted mix.
    np.testing.assert_array_equal(frame[:100], texture[:100])
    top, left, cov = renderer.coverage(300.4, 200.7)
    rim = np.argwhere((cov > 0.2) & (cov < 0.8))[0]
    i, j = int(rim[0]) + top, int(rim[1]) + left
    bg_y = int(i420_planes(texture, W, H)[0][i, j])
    ball_value = rgb_to_ycbcr601(*BALL_RGB)[0]
    expected = int(bg_y + cov[rim[0], rim[1]] * (ball_value - bg_y) + 0.5)
    assert y_plane[i, j] == expected


def test_background_of_the_wrong_size_is_refused() -> None:
    renderer = Renderer(W, H, 20.0)
    with pytest.raises(ValueError, match="I420 640x480"):
        renderer.render_i420(100.0, 100.0, background=_uniform(320, 240, (16, 128, 128)))
    with pytest.raises(ValueError, match="uint8"):
        renderer.render_i420(100.0, 100.0, background=np.zeros((H * 3 // 2, W), np.float32))
