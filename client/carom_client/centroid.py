"""Find the ball in a decoded frame: the reference detector shared by the Python client and tests.

The I420 detector reads only the V (Cr) plane: the ball is saturated orange-red (Cr far above
neutral 128) on a black background, so one quarter-size plane and one threshold find it, which
is also what the browser page does; matching it exactly here keeps both clients' positions
comparable. Coordinates are continuous luma pixels, the same as the physics and the schemas:
pixel ``j`` spans ``[j, j + 1]`` (centre ``j + 0.5``); chroma sample ``c`` covers luma ``2c`` and
``2c + 1``, so its centre is ``2c + 1``.

Accepted inputs:

- ``centroid_i420``: the packed yuv420p array of ``av.VideoFrame.to_ndarray(format="yuv420p")``
  (and of the simulator's renderer): shape ``(height * 3 // 2, width)`` or any array of
  ``width * height * 3 // 2`` bytes, holding Y, then U, then V, each plane row after row with no
  padding.
- ``centroid_v_plane``: just the V plane, ``(height / 2, width / 2)``, any strides. For a decoded
  frame with line padding, with ``p = frame.planes[2]``, a zero-copy view of it is
  ``np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width]``.
- ``centroid_rgb``: an ``(height, width, 3)`` RGB array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from carom.detection import V_NEUTRAL, V_THRESHOLD

__all__ = [
    "RGB_B_MAX",
    "RGB_G_MAX",
    "RGB_R_MIN",
    "V_THRESHOLD",
    "centroid_i420",
    "centroid_rgb",
    "centroid_v_plane",
]

# The colour rule (Cr above V_THRESHOLD, weight Cr - V_NEUTRAL) is the contract's:
# carom.detection, shared with the page and the simulator's background check.
_V_NEUTRAL: Final = V_NEUTRAL
#: RGB ball mask: strongly red, weakly green and blue.
RGB_R_MIN: Final = 150
RGB_G_MAX: Final = 100
RGB_B_MAX: Final = 100


def _weighted_centroid(
    mask: npt.NDArray[np.bool_], weights_of: Callable[[slice, slice], npt.NDArray[np.float64]]
) -> tuple[float, float] | None:
    """Centroid (column, row) of ``weights_of(rows, cols)`` over the bounding box of ``mask``.

    Cropping to the mask's bounding box first (two cheap ``any`` reductions) avoids
    ``np.nonzero`` on the whole frame, which costs far more than the arithmetic on a small ball.
    ``weights_of`` must return zero outside the mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(mask[r0:r1].any(axis=0))
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    weights = weights_of(slice(r0, r1), slice(c0, c1))
    total = float(weights.sum())
    if total <= 0.0:
        return None
    cx = float(weights.sum(axis=0) @ np.arange(c0, c1, dtype=np.float64)) / total
    cy = float(weights.sum(axis=1) @ np.arange(r0, r1, dtype=np.float64)) / total
    return (cx, cy)


def centroid_v_plane(v: npt.NDArray[np.uint8]) -> tuple[float, float] | None:
    """Ball centre from a V (Cr) plane, in luma pixel coordinates; None when no pixel exceeds
    ``V_THRESHOLD``.

    Each sample is weighted by ``V - 128`` so that the anti-aliased rim counts in proportion to
    how much of it is ball, which keeps the estimate sub-pixel.
    """
    if v.ndim != 2:
        raise ValueError(f"V plane must be 2-D, got shape {v.shape}")
    mask = v > V_THRESHOLD

    def weights_of(rows: slice, cols: slice) -> npt.NDArray[np.float64]:
        crop = v[rows, cols].astype(np.float64)
        return np.where(mask[rows, cols], crop - _V_NEUTRAL, 0.0)

    found = _weighted_centroid(mask, weights_of)
    if found is None:
        return None
    return (2.0 * found[0] + 1.0, 2.0 * found[1] + 1.0)


def centroid_i420(
    arr: npt.NDArray[np.uint8], width: int, height: int
) -> tuple[float, float] | None:
    """Ball centre from a packed I420 frame (see module docstring); None when there is no ball."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"width and height must be positive and even, got {width}x{height}")
    y_size = width * height
    if arr.size != y_size * 3 // 2:
        raise ValueError(f"I420 {width}x{height} needs {y_size * 3 // 2} values, got {arr.size}")
    v_start = y_size + y_size // 4
    v = arr.reshape(-1)[v_start:].reshape(height // 2, width // 2)
    return centroid_v_plane(v)


def centroid_rgb(rgb: npt.NDArray[np.uint8]) -> tuple[float, float] | None:
    """Ball centre from an RGB frame, in pixel coordinates; None when no pixel passes the mask.

    The mask is ``R > 150 & G < 100 & B < 100``; each pixel is weighted by ``R - 150``, which
    falls to zero at the mask's edge, so a rim pixel crossing the threshold does not jump the
    estimate by a whole pixel's weight.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"RGB frame must have shape (height, width, 3), got {rgb.shape}")
    red, green, blue = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    mask = (red > RGB_R_MIN) & (green < RGB_G_MAX) & (blue < RGB_B_MAX)

    def weights_of(rows: slice, cols: slice) -> npt.NDArray[np.float64]:
        crop = red[rows, cols].astype(np.float64)
        return np.where(mask[rows, cols], crop - RGB_R_MIN, 0.0)

    found = _weighted_centroid(mask, weights_of)
    if found is None:
        return None
    return (found[0] + 0.5, found[1] + 0.5)
