"""Tests for the reference ball detector on frames from the simulator's renderer."""

from __future__ import annotations

import random
from typing import Any

import av as _av
import numpy as np
import pytest

from carom_client.centroid import centroid_i420, centroid_rgb, centroid_v_plane
from carom_simulator.render import Renderer, i420_planes

#: PyAV as untyped, as the tests poke at planes and buffers its stubs do not describe.
av: Any = _av

W, H = 640, 480


def _positions(radius: float, count: int, seed: int) -> list[tuple[float, float]]:
    """Random sub-pixel centres plus the four corners of the visible area (ball touching two
    edges at once)."""
    rng = random.Random(seed)
    lo, hx, hy = radius, W - radius, H - radius
    out = [(rng.uniform(lo, hx), rng.uniform(lo, hy)) for _ in range(count)]
    return [*out, (lo, lo), (hx, lo), (lo, hy), (hx, hy)]


@pytest.mark.parametrize("radius", [10.0, 20.0, 37.5])
def test_i420_centroid_matches_true_centre(radius: float) -> None:
    renderer = Renderer(W, H, radius)
    for x, y in _positions(radius, 150, seed=int(radius)):
        found = centroid_i420(renderer.render_i420(x, y), W, H)
        assert found is not None
        assert abs(found[0] - x) < 0.1 and abs(found[1] - y) < 0.1, (x, y, found)


@pytest.mark.parametrize("radius", [10.0, 20.0, 37.5])
def test_rgb_centroid_matches_true_centre(radius: float) -> None:
    renderer = Renderer(W, H, radius)
    for x, y in _positions(radius, 150, seed=int(radius) + 1):
        found = centroid_rgb(renderer.render_rgb(x, y))
        assert found is not None
        assert abs(found[0] - x) < 0.1 and abs(found[1] - y) < 0.1, (x, y, found)


def test_empty_frames_give_none() -> None:
    renderer = Renderer(W, H, 20.0)
    black = renderer.render_i420(-1000.0, -1000.0)
    assert centroid_i420(black, W, H) is None
    assert centroid_rgb(np.zeros((H, W, 3), dtype=np.uint8)) is None
    # Chroma at or below the threshold, and red that fails the mask, are not ball.
    _, _, v_plane = i420_planes(black, W, H)
    v_plane[10:20, 10:20] = 135
    assert centroid_i420(black, W, H) is None
    white = np.full((H, W, 3), 255, dtype=np.uint8)
    assert centroid_rgb(white) is None


def test_accepts_flat_buffers_and_padded_planes() -> None:
    renderer = Renderer(W, H, 20.0)
    frame = renderer.render_i420(123.4, 321.9)
    expected = centroid_i420(frame, W, H)
    assert expected is not None
    assert centroid_i420(frame.reshape(-1), W, H) == expected
    # A decoder's plane with line padding, seen through a strided view.
    padded = np.full((H // 2, W // 2 + 48), 255, dtype=np.uint8)
    padded[:, : W // 2] = i420_planes(frame, W, H)[2]
    assert centroid_v_plane(padded[:, : W // 2]) == expected


def test_chroma_noise_below_threshold_is_ignored() -> None:
    renderer = Renderer(W, H, 20.0)
    frame = renderer.render_i420(250.25, 140.75)
    _, _, v_plane = i420_planes(frame, W, H)
    noise = np.random.default_rng(0).integers(-7, 8, size=v_plane.shape)
    background = v_plane == 128
    v_plane[background] = (128 + noise[background]).astype(np.uint8)
    found = centroid_i420(frame, W, H)
    assert found is not None
    assert abs(found[0] - 250.25) < 0.1 and abs(found[1] - 140.75) < 0.1


def test_bad_inputs_raise() -> None:
    frame = np.zeros((H * 3 // 2, W), dtype=np.uint8)
    with pytest.raises(ValueError, match="needs"):
        centroid_i420(frame, W, H + 2)
    with pytest.raises(ValueError, match="even"):
        centroid_i420(frame, W + 1, H)
    with pytest.raises(ValueError, match="2-D"):
        centroid_v_plane(np.zeros(10, dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        centroid_rgb(np.zeros((H, W), dtype=np.uint8))


def test_pyav_frames() -> None:
    renderer = Renderer(W, H, 20.0)
    frame = renderer.render_i420(401.7, 99.2)
    expected = centroid_i420(frame, W, H)
    video = av.VideoFrame.from_ndarray(frame, format="yuv420p")
    assert centroid_i420(video.to_ndarray(format="yuv420p"), W, H) == expected
    plane = video.planes[2]
    v_plane = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    assert centroid_v_plane(v_plane[:, : plane.width]) == expected


def test_survives_h264_round_trip() -> None:
    assert "libx264" in av.codecs_available  # PyAV's wheels ship it; the simulator needs it
    width, height = 320, 240
    renderer = Renderer(width, height, 20.0)
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.framerate = 30
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "23"}
    decoder = av.CodecContext.create("h264", "r")
    rng = random.Random(0)
    truth = [(rng.uniform(20.0, 299.5), rng.uniform(20.0, 219.5)) for _ in range(20)]
    decoded = []
    for pts, (x, y) in enumerate(truth):
        video = av.VideoFrame.from_ndarray(renderer.render_i420(x, y), format="yuv420p")
        video.pts = pts
        for packet in encoder.encode(video):
            decoded.extend(decoder.decode(packet))
    for packet in encoder.encode(None):  # flush
        decoded.extend(decoder.decode(packet))
    assert len(decoded) == len(truth)
    for out, (x, y) in zip(decoded, truth, strict=True):
        found = centroid_i420(out.to_ndarray(format="yuv420p"), width, height)
        assert found is not None
        assert abs(found[0] - x) < 0.25 and abs(found[1] - y) < 0.25
