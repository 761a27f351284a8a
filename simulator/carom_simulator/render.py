"""Render the ball straight into the encoder's pixel format (I420 / yuv420p).

Rendering RGB and letting swscale convert it would cost a full-frame colour conversion per frame
and leave the colour matrix to whatever swscale defaults to; writing I420 directly costs only the
ball's bounding box and pins the matrix to BT.601 limited range, which is what libx264 signals by
default and what browsers assume for untagged SD video.

Pixel convention (Carom-wide): continuous coordinates, pixel (row i, column j) covers
``[j, j + 1] x [i, i + 1]``, so its centre is at ``j + 0.5`` and the frame spans ``[0, width] x
[0, height]``, exactly the box the physics keeps the ball in. A chroma sample ``c`` (covering luma
``2c, 2c + 1``) is centred at ``2c + 1``; ``carom_client.centroid`` and the page rely on both.

I420 layout (what ``av.VideoFrame.from_ndarray(arr, format="yuv420p")`` reads and
``frame.to_ndarray(format="yuv420p")`` returns): one C-contiguous uint8 array of shape
``(height * 3 // 2, width)`` whose flat buffer is the Y plane (``height x width``), then the U (Cb)
plane, then the V (Cr) plane, each ``(height / 2) x (width / 2)`` stored row after row with no
padding. Viewed as 2-D, U fills the ``height / 4`` rows after Y and V the last ``height / 4`` rows,
each 2-D row holding two chroma rows side by side (when ``height % 4 == 2`` the U/V boundary falls
mid-row, so always slice the flat buffer; ``i420_planes`` does).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BALL_RGB",
    "Renderer",
    "i420_planes",
    "rgb_to_ycbcr601",
]

#: Default ball colour: a saturated orange-red whose Cr (V) is far above any neutral background.
BALL_RGB: Final = (255, 48, 0)

_KR: Final = 0.299
_KB: Final = 0.114
_KG: Final = 1.0 - _KR - _KB

U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]


def rgb_to_ycbcr601(r: float, g: float, b: float) -> tuple[float, float, float]:
    """BT.601 limited-range ("TV") Y'CbCr of an 8-bit R'G'B' colour, unrounded.

    Y spans 16..235 and Cb/Cr 16..240 around 128: the range libx264 and browsers assume when the
    stream carries no colour tags.
    """
    luma = (_KR * r + _KG * g + _KB * b) / 255.0
    cb = 0.5 * (b / 255.0 - luma) / (1.0 - _KB)
    cr = 0.5 * (r / 255.0 - luma) / (1.0 - _KR)
    return (16.0 + 219.0 * luma, 128.0 + 224.0 * cb, 128.0 + 224.0 * cr)


def i420_planes(frame: U8, width: int, height: int) -> tuple[U8, U8, U8]:
    """Y, U, V plane views of a packed I420 buffer (module docstring), writes go through."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"width and height must be positive and even, got {width}x{height}")
    y_size = width * height
    if frame.size != y_size * 3 // 2:
        raise ValueError(f"I420 {width}x{height} needs {y_size * 3 // 2} bytes, got {frame.size}")
    flat = frame.reshape(-1)
    c_size = y_size // 4
    return (
        flat[:y_size].reshape(height, width),
        flat[y_size : y_size + c_size].reshape(height // 2, width // 2),
        flat[y_size + c_size :].reshape(height // 2, width // 2),
    )


class Renderer:
    """Draws an anti-aliased disc of fixed size and colour on black, as I420 or RGB.

    Every call returns a freshly allocated array that the caller owns: frames are handed to an
    encoder on another thread, so reusing one output buffer would let a later render overwrite a
    frame still being encoded. Only the bounding box is computed per frame; the rest is a copy of
    a cached black frame. Thread-safe as long as the instance is not mutated (it never is).
    """

    __slots__ = (
        "_ball_ycc",
        "_bg_i420",
        "_bg_ycc",
        "color",
        "height",
        "radius",
        "width",
    )

    def __init__(
        self,
        width: int,
        height: int,
        radius: float,
        color: tuple[int, int, int] = BALL_RGB,
    ) -> None:
        if not isinstance(width, int) or not isinstance(height, int):
            raise ValueError(f"width and height must be ints, got {width!r}x{height!r}")
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        if not math.isfinite(radius) or radius <= 0.0:
            raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
        if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
            raise ValueError(f"color must be three ints in 0..255, got {color!r}")
        self.width: Final = width
        self.height: Final = height
        self.radius: Final = float(radius)
        self.color: Final = (int(color[0]), int(color[1]), int(color[2]))
        self._bg_ycc: Final = rgb_to_ycbcr601(0.0, 0.0, 0.0)
        self._ball_ycc: Final = rgb_to_ycbcr601(*self.color)
        bg = np.empty((height * 3 // 2, width), dtype=np.uint8)
        for plane, value in zip(i420_planes(bg, width, height), self._bg_ycc, strict=True):
            plane[...] = round(value)
        bg.flags.writeable = False
        self._bg_i420: Final = bg

    def coverage(self, x: float, y: float) -> tuple[int, int, F64]:
        """Exact fraction of each pixel covered by the disc, over its bounding box.

        Returns ``(top, left, cov)`` with ``cov[i, j]`` the coverage of pixel
        ``(top + i, left + j)``. The box starts and ends on even rows/columns (clipped to the
        frame), so it maps onto whole chroma samples. Areas are exact (no supersampling), so the
        only centroid error left is the pixel grid's own and the final rounding to 8 bits.
        """
        r = self.radius
        left = max(math.floor(x - r) & ~1, 0)
        right = min((math.floor(x + r) + 2) & ~1, self.width)
        top = max(math.floor(y - r) & ~1, 0)
        bottom = min((math.floor(y + r) + 2) & ~1, self.height)
        if right <= left or bottom <= top:
            return (0, 0, np.zeros((0, 0), dtype=np.float64))
        # Pixel edges relative to the ball centre; pixel j spans [j, j + 1].
        col_edges = np.arange(left, right + 1, dtype=np.float64) - x
        row_edges = np.arange(top, bottom + 1, dtype=np.float64) - y
        area = _quadrant_area(col_edges[np.newaxis, :], row_edges[:, np.newaxis], r)
        # Inclusion-exclusion over the corners turns "area below-left of" into area per pixel.
        cov: F64 = area[1:, 1:] - area[:-1, 1:] - area[1:, :-1] + area[:-1, :-1]
        np.maximum(cov, 0.0, out=cov)  # rounding noise only: the true values are in [0, 1]
        np.minimum(cov, 1.0, out=cov)
        return (top, left, cov)

    def render_i420(self, x: float, y: float, background: U8 | None = None) -> U8:
        """A new packed I420 frame (layout in the module docstring) with the ball at ``(x, y)``.

        ``background``: a packed I420 frame of this renderer's size to draw the ball over
        (``carom_simulator.background``) instead of black. It is copied, never written, so a
        source may hand the same read-only array to several frames. The ball is blended with
        the same per-pixel coverage either way (``out = bg + cov * (ball - bg)``, in Y and,
        box-filtered, in the subsampled chroma), so over a uniform background equal to black
        both paths give identical frames. The plain path keeps its scalar background and costs
        what it did (timeit, best of 5, on the shared 2-core machine: 0.20-0.22 ms at 640x480
        before and after); the background path 0.24-0.26 ms at 640x480 and 0.41-0.83 ms at
        1280x720, where the full-frame copy alone is 0.15 ms (bench/results/background.json).
        """
        if background is None:
            out = self._bg_i420.copy()
        else:
            if background.dtype != np.uint8 or background.size != self._bg_i420.size:
                raise ValueError(
                    f"background must be a uint8 I420 {self.width}x{self.height} frame "
                    f"({self._bg_i420.size} bytes), got {background.dtype} of {background.size}"
                )
            out = np.array(background.reshape(self._bg_i420.shape), dtype=np.uint8, order="C")
        top, left, cov = self.coverage(x, y)
        if cov.size == 0:
            return out
        rows, cols = cov.shape
        plane_y, plane_u, plane_v = i420_planes(out, self.width, self.height)
        ball_y, ball_u, ball_v = self._ball_ycc
        # Box-filtered chroma: each sample is the mean coverage of its 2x2 luma block.
        cov_c = 0.25 * (cov[0::2, 0::2] + cov[0::2, 1::2] + cov[1::2, 0::2] + cov[1::2, 1::2])
        luma = (slice(top, top + rows), slice(left, left + cols))
        chroma = (slice(top // 2, (top + rows) // 2), slice(left // 2, (left + cols) // 2))
        # Blending in Y'CbCr equals blending in gamma-encoded RGB: the conversion is affine.
        if background is None:
            bg_y, bg_u, bg_v = self._bg_ycc
            plane_y[luma] = _blend(cov, round(bg_y), ball_y)
            plane_u[chroma] = _blend(cov_c, round(bg_u), ball_u)
            plane_v[chroma] = _blend(cov_c, round(bg_v), ball_v)
        else:
            plane_y[luma] = _blend_over(cov, plane_y[luma], ball_y)
            plane_u[chroma] = _blend_over(cov_c, plane_u[chroma], ball_u)
            plane_v[chroma] = _blend_over(cov_c, plane_v[chroma], ball_v)
        return out

    def render_rgb(self, x: float, y: float) -> U8:
        """A new ``(height, width, 3)`` RGB frame with the ball at ``(x, y)``, as a reference."""
        out = np.zeros((self.height, self.width, 3), dtype=np.uint8)
        top, left, cov = self.coverage(x, y)
        if cov.size == 0:
            return out
        rows, cols = cov.shape
        color = np.asarray(self.color, dtype=np.float64)
        patch = cov[:, :, np.newaxis] * color + 0.5
        out[top : top + rows, left : left + cols] = patch.astype(np.uint8)
        return out


def _strip_integral(u: F64, r: float) -> F64:
    """Antiderivative of the half-chord ``sqrt(r^2 - u^2)``, for ``u`` clipped to ``[-r, r]``."""
    u = np.minimum(np.maximum(u, -r), r)
    return 0.5 * (u * np.sqrt(r * r - u * u) + r * r * np.arcsin(u / r))


def _quadrant_area(a: F64, b: F64, r: float) -> F64:
    """Area of the disc of radius ``r`` at the origin with ``X <= a`` and ``Y <= b``.

    ``a`` is a row vector (column edges) and ``b`` a column vector (row edges); the result is
    their outer grid. Integrating the horizontal chord clipped at ``X = a`` over ``Y`` splits at
    ``|Y| = s = sqrt(r^2 - a^2)``: inside, the chord runs from ``-w`` to ``a`` (length ``a + w``);
    outside, it is all of ``2w`` for ``a >= 0`` and empty for ``a < 0``. With ``F`` the
    antiderivative of ``w`` (odd and increasing), the pieces sum to
    ``k (F(b) + pi r^2 / 4) + (1 - k) (clip(F(b), -F(s), F(s)) + F(s)) + a (clip(b, -s, s) + s)``
    with ``k = 2`` for ``a >= 0`` else ``0``. Only the 1-D edge vectors need ``arcsin``, which
    is what keeps this cheap; ``s = 0`` for ``|a| >= r`` makes it hold clear of the disc too.
    """
    s = np.sqrt(np.maximum(r * r - a * a, 0.0))
    f_s = _strip_integral(s, r)
    f_b = _strip_integral(b, r)
    k = np.where(a >= 0.0, 2.0, 0.0)
    inner = np.minimum(np.maximum(f_b, -f_s), f_s) + f_s
    chord = np.minimum(np.maximum(b, -s), s) + s
    area: F64 = k * (f_b + 0.25 * math.pi * r * r) + (1.0 - k) * inner + a * chord
    return area


def _blend(cov: F64, background: int, ball: float) -> U8:
    """Round ``background + cov * (ball - background)`` to uint8 (the result stays in 0..255)."""
    return (cov * (ball - background) + (background + 0.5)).astype(np.uint8)


def _blend_over(cov: F64, background: U8, ball: float) -> U8:
    """``_blend`` with a per-pixel background: the same formula and rounding, elementwise."""
    bg = background.astype(np.float64)
    return (cov * (ball - bg) + (bg + 0.5)).astype(np.uint8)
